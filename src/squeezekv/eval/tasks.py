"""Evaluation tasks: each turns offline texts into tokenised :class:`Example` s (prompts are built by project code).

* ``needle``: Paul Graham essays as haystack, a fact hidden at a depth, the question after the text; scored by exact
  retrieval of the fact's key.
* ``qa``: one gold passage (bigbench natural_instructions quoref/drop/multirc) among distractor passages of the same
  subtask up to a target length; the question placed before or after the passages; scored by token F1 and exact match.
* ``ppl``: a long document cut to ``prefix + continuation`` tokens; the continuation's log-likelihood given the
  compressed prefix (perplexity), on essays and on Linux kernel documentation.
* ``ruler``: NVIDIA's RULER subtasks (needles, variable tracking, common/frequent words, SQuAD/HotpotQA) at each
  context length, generated offline by :mod:`squeezekv.eval.ruler`; scored by RULER's string match.

Task builders are registered once in :data:`TASKS`; the CLI and the grid read it. The needle prompt's pieces
(:data:`NEEDLES`, :func:`haystack`, :func:`insert_needle`, :func:`chat_prompt`) and :func:`read_prompt_file` are also
what ``squeezekv run`` builds its prompt from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .data import Sources
from .ruler import SUBTASKS as RULER_SUBTASKS
from .ruler import build_ruler_examples, length_label


# -- prompts --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Needle:
    """A fact hidden in a haystack, the question that retrieves it, and the string that proves retrieval."""

    fact: str
    question: str
    key: str


NEEDLES: tuple[Needle, ...] = (
    Needle("The special magic number for Lisbon is 7291.", "What is the special magic number for Lisbon?", "7291"),
    Needle(
        "The secret ingredient of Grandma Rosa's soup is smoked paprika.",
        "What is the secret ingredient of Grandma Rosa's soup?",
        "paprika",
    ),
    Needle("The name of the lighthouse keeper's dog is Biscuit.", "What is the name of the lighthouse keeper's dog?",
           "Biscuit"),
)


def read_prompt_file(path: str | Path) -> str:
    """The text of a ``--prompt-file``; ``ValueError`` naming the problem for a folder, a missing or a binary file."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"prompt file {str(path)!r} is a folder, not a text file")
    if not p.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist")
    data = p.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"prompt file {str(path)!r} looks binary (a NUL byte at offset {data.index(0)}): give a "
                         "text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                         f"{err.start} is not valid UTF-8): give a text file") from None
    return text


def haystack(tokenizer: Any, n_tokens: int, essays: list[tuple[str, str]]) -> str:
    """About ``n_tokens`` tokens of essay text, cut at a sentence end."""
    text = "\n\n".join(body.strip() for _, body in essays)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    cut = tokenizer.decode(ids)
    end = cut.rfind(". ")
    return cut[: end + 1] if end > len(cut) // 2 else cut


def insert_needle(text: str, fact: str, depth: float) -> str:
    """Put ``fact`` at the first sentence boundary after ``depth`` (0 = start, 1 = end) of ``text``."""
    if depth <= 0:
        return f"{fact} {text}"
    pos = int(len(text) * depth)
    boundary = text.find(". ", pos)
    if depth >= 1 or boundary < 0:
        return f"{text} {fact}"
    return f"{text[: boundary + 1]} {fact}{text[boundary + 1:]}"


def _chat(tokenizer: Any, content: str) -> list[int]:
    """Token ids of a one-turn chat whose user message is ``content`` (the tokenizer's chat template, else
    ``content`` + ``"\nAnswer:"``)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(content + "\nAnswer:")["input_ids"])


def chat_prompt(tokenizer: Any, context: str, question: str) -> list[int]:
    """Token ids of a one-turn chat: the context, then the question (asked after the context)."""
    return _chat(tokenizer, f"{context}\n\nAnswer the question from the text above.\n{question}")


# -- examples -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenised evaluation example.

    ``kind`` is ``"generate"`` (greedy answer of at most ``max_new_tokens`` tokens, scored against ``meta``) or
    ``"loglik"`` (log-likelihood of ``continuation`` after ``prompt``). ``subset`` groups examples in the report
    (e.g. QA placement, perplexity source); ``meta`` holds what the scorer needs and what the plots group by.
    """

    id: str
    task: str
    subset: str
    kind: str
    prompt: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 0
    continuation: tuple[int, ...] = ()


@dataclass
class TaskOptions:
    """Sizes of every task (defaults: the issue's ranges; a CPU run passes smaller ones)."""

    needle_lengths: tuple[int, ...] = (1000, 2000, 4000, 7500)
    needle_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    needles: int = 3
    needle_new_tokens: int = 12
    qa_length: int = 1500
    qa_per_subtask: int = 4
    qa_placements: tuple[str, ...] = ("before", "after")
    qa_new_tokens: int = 16
    qa_split: str = "test"
    ppl_sources: tuple[str, ...] = ("essays", "linux-doc")
    ppl_docs: int = 4
    ppl_prefix: int = 1024
    ppl_tokens: int = 256
    ruler_subtasks: tuple[str, ...] = RULER_SUBTASKS
    ruler_lengths: tuple[int, ...] = (4096, 8192)
    ruler_samples: int = 50
    seed: int = 0

    def validate(self) -> None:
        if not self.needle_lengths or min(self.needle_lengths) < 64:
            raise ValueError(f"needle_lengths={self.needle_lengths!r} is out of range: each must be >= 64 tokens")
        if not self.needle_depths or not all(0.0 <= d <= 1.0 for d in self.needle_depths):
            raise ValueError(f"needle_depths={self.needle_depths!r} is out of range: each must be in [0, 1]")
        if not 1 <= self.needles <= len(NEEDLES):
            raise ValueError(f"needles={self.needles!r} is out of range: 1..{len(NEEDLES)}")
        if self.qa_length < 64 or self.qa_per_subtask < 1:
            raise ValueError(
                f"qa_length={self.qa_length!r} / qa_per_subtask={self.qa_per_subtask!r} out of range: "
                "need >= 64 tokens and >= 1 example"
            )
        bad = [p for p in self.qa_placements if p not in ("before", "after")]
        if bad or not self.qa_placements:
            raise ValueError(f"qa_placements={self.qa_placements!r}: each must be 'before' or 'after'")
        if self.qa_split not in ("dev", "test"):
            raise ValueError(f"qa_split={self.qa_split!r}: choose 'dev' (tuning) or 'test' (reporting)")
        bad = [s for s in self.ppl_sources if s not in ("essays", "linux-doc")]
        if bad or not self.ppl_sources:
            raise ValueError(f"ppl_sources={self.ppl_sources!r}: each must be 'essays' or 'linux-doc'")
        if self.ppl_docs < 1 or self.ppl_prefix < 16 or self.ppl_tokens < 1:
            raise ValueError(
                f"ppl_docs={self.ppl_docs!r}, ppl_prefix={self.ppl_prefix!r}, ppl_tokens={self.ppl_tokens!r} out of "
                "range: need >= 1 document, a prefix >= 16 tokens and >= 1 scored token"
            )
        bad = [t for t in self.ruler_subtasks if t not in RULER_SUBTASKS]
        if bad or not self.ruler_subtasks:
            raise ValueError(f"ruler_subtasks={self.ruler_subtasks!r}: each must be one of {', '.join(RULER_SUBTASKS)}")
        if not self.ruler_lengths or min(self.ruler_lengths) < 256:
            raise ValueError(f"ruler_lengths={self.ruler_lengths!r} is out of range: each must be >= 256 tokens")
        if self.ruler_samples < 1:
            raise ValueError(f"ruler_samples={self.ruler_samples!r} is out of range: need >= 1 example per subtask")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_needle(tokenizer: Any, sources: Sources, opts: TaskOptions) -> list[Example]:
    """Every length x depth x needle: the fact inserted at a sentence boundary, the question after the text."""
    essays = sources.get_essays()
    out = []
    # needle-major order: the first examples of a length already span every depth (useful when a grid is cut short)
    for length in opts.needle_lengths:
        text = haystack(tokenizer, length, essays)
        for k, needle in enumerate(NEEDLES[: opts.needles]):
            for depth in opts.needle_depths:
                prompt = chat_prompt(tokenizer, insert_needle(text, needle.fact, depth), needle.question)
                out.append(Example(
                    id=f"needle/len{length}/depth{depth:g}/n{k}", task="needle", subset="", kind="generate",
                    prompt=tuple(prompt), max_new_tokens=opts.needle_new_tokens,
                    meta={"length": length, "depth": depth, "needle": k, "key": needle.key},
                ))
    return out


def qa_content(context: str, question: str, placement: str) -> str:
    """User message of a QA prompt: the question only before, or only after, the passages."""
    if placement == "before":
        return (f"Question: {question}\n\nThe passages below contain the answer.\n\n{context}\n\n"
                "Answer the question asked before the passages with a short phrase.")
    return f"{context}\n\nAnswer the question from the passages above with a short phrase.\nQuestion: {question}"


def build_qa(tokenizer: Any, sources: Sources, opts: TaskOptions) -> list[Example]:
    """Per subtask, ``qa_per_subtask`` questions of the chosen split; the gold passage at a random slot among
    distractor passages (other passages of the same subtask and split) filling ``qa_length`` tokens."""
    records = [r for r in sources.get_qa() if r.split == opts.qa_split]
    out = []
    for subtask in sorted({r.subtask for r in records}):
        pool = [r for r in records if r.subtask == subtask]
        rng = random.Random(f"{opts.seed}/{subtask}")
        chosen = rng.sample(pool, min(opts.qa_per_subtask, len(pool)))
        passages = sorted({r.passage for r in pool})
        for rec in chosen:
            gold_len = len(_ids(tokenizer, rec.passage))
            others = [p for p in passages if p != rec.passage]
            rng.shuffle(others)
            picked, used = [], gold_len
            for p in others:
                n = len(_ids(tokenizer, p))
                if used + n > opts.qa_length:
                    continue
                picked.append(p)
                used += n
            slot = rng.randint(0, len(picked))
            picked.insert(slot, rec.passage)
            context = "\n\n".join(f"Passage {i + 1}: {p}" for i, p in enumerate(picked))
            for placement in opts.qa_placements:
                prompt = _chat(tokenizer, qa_content(context, rec.question, placement))
                out.append(Example(
                    id=f"qa/{subtask}/{rec.index}/len{opts.qa_length}/{placement}", task="qa",
                    subset=f"question {placement}", kind="generate", prompt=tuple(prompt),
                    max_new_tokens=opts.qa_new_tokens,
                    meta={"subtask": subtask, "answers": list(rec.answers), "options": rec.options,
                          "gold_slot": slot, "passages": len(picked), "placement": placement},
                ))
    if not out:
        raise ValueError(f"no QA record in split {opts.qa_split!r}")
    return out


def build_ppl(tokenizer: Any, sources: Sources, opts: TaskOptions) -> list[Example]:
    """Per source, ``ppl_docs`` documents of at least ``prefix + tokens`` tokens (shuffled with the seed), each cut to
    that length: the last ``ppl_tokens`` are scored given the (compressed) prefix."""
    need = opts.ppl_prefix + opts.ppl_tokens
    out = []
    for source in opts.ppl_sources:
        docs = list(sources.get_docs(source))
        random.Random(f"{opts.seed}/{source}").shuffle(docs)
        found = 0
        for name, text in docs:
            ids = _ids(tokenizer, text[: need * 12])  # a token is rarely more than 12 characters
            if len(ids) < need:
                continue
            ids = ids[:need]
            out.append(Example(
                id=f"ppl/{source}/{name}/p{opts.ppl_prefix}/t{opts.ppl_tokens}", task="ppl", subset=source,
                kind="loglik", prompt=tuple(ids[: opts.ppl_prefix]), continuation=tuple(ids[opts.ppl_prefix:]),
                meta={"source": source, "doc": name},
            ))
            found += 1
            if found == opts.ppl_docs:
                break
        if found < opts.ppl_docs:
            raise ValueError(
                f"perplexity source {source!r} has only {found} documents of >= {need} tokens; "
                f"{opts.ppl_docs} requested: lower --ppl-docs or --ppl-prefix"
            )
    return out


def build_ruler(tokenizer: Any, sources: Sources, opts: TaskOptions) -> list[Example]:
    """``ruler_samples`` examples per subtask x context length (see :mod:`squeezekv.eval.ruler`); the subset is
    ``"<length>/<subtask>"`` (e.g. ``"4k/niah_single_1"``), so the report gives each subtask and, per length, their
    average (``"4k/all"``: every subtask has the same number of examples, so it is RULER's average of subtasks)."""
    out = []
    for item in build_ruler_examples(tokenizer, sources.get_ruler(), opts.ruler_subtasks, opts.ruler_lengths,
                                     opts.ruler_samples, seed=opts.seed):
        label = length_label(item["length"])
        out.append(Example(
            id=f"ruler/{label}/{item['subtask']}/{item['index']}", task="ruler", subset=f"{label}/{item['subtask']}",
            kind="generate", prompt=tuple(item["prompt"]), max_new_tokens=item["max_new_tokens"],
            meta={"subtask": item["subtask"], "length": item["length"], "references": item["references"],
                  "metric": item["metric"], "haystack": item["haystack"]},
        ))
    return out


#: task name -> (builder, metrics the scorer reports, short description)
TASKS: dict[str, tuple[Callable[[Any, Sources, TaskOptions], list[Example]], tuple[str, ...], str]] = {
    "needle": (build_needle, ("retrieval",), "needle in a haystack of Paul Graham essays, exact retrieval"),
    "qa": (build_qa, ("f1", "em"), "passage QA among distractors (bigbench quoref/drop/multirc), token F1 / EM"),
    "ppl": (build_ppl, ("nll",), "log-likelihood of a document's last tokens given its compressed prefix"),
    "ruler": (build_ruler, ("ruler",), "RULER subtasks at 4k/8k/... tokens (offline), RULER's string match"),
}


def parse_tasks(names: str | list[str]) -> list[str]:
    """``"needle,qa"`` -> ``["needle", "qa"]``; unknown names raise naming the known ones."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    items = [n for n in items if n]
    if not items:
        raise ValueError("no task given; choose from: " + ", ".join(TASKS))
    bad = [n for n in items if n not in TASKS]
    if bad:
        raise ValueError(f"unknown task {bad[0]!r}; choose from: {', '.join(TASKS)}")
    return items


def build_examples(names: list[str], tokenizer: Any, sources: Sources, opts: TaskOptions) -> list[Example]:
    """All examples of the given tasks, in a deterministic order."""
    opts.validate()
    out: list[Example] = []
    for name in parse_tasks(names):
        out.extend(TASKS[name][0](tokenizer, sources, opts))
    ids = [e.id for e in out]
    if len(set(ids)) != len(ids):
        raise ValueError("two examples share an id; the task options produce duplicates")
    return out
