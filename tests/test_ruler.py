"""RULER task: generators on tiny in-memory data (no download), RULER's scoring, the eval grid end to end."""

from __future__ import annotations

import json
import math
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from squeezekv.eval import GridConfig, Sources, TaskOptions, evaluate
from squeezekv.eval.grid import score
from squeezekv.eval.ruler import (
    SUBTASKS,
    RulerData,
    build_ruler_examples,
    length_label,
    load_ruler,
    split_sentences,
    string_match,
    zeta,
)
from squeezekv.eval.tasks import Example

WORDS = ("the cat sat on a mat and we saw many quiet ships under bright stars while old friends wrote long letters "
         "about rivers hills towns roads music bread").split()

TEMPLATES = {  # the shape of RULER's constants.TASKS (short wording)
    "niah": {"tokens_to_generate": 16, "template": "Some special magic {type_needle_v} are hidden.\n{context}\n"
             "What are all the special magic {type_needle_v} for {query} mentioned?",
             "answer_prefix": " The special magic {type_needle_v} for {query} mentioned are"},
    "variable_tracking": {"tokens_to_generate": 8, "template": "Track.\n\n{context}\nQuestion: Find all variables "
                          "that are assigned the value {query}.",
                          "answer_prefix": " Answer: {num_v} variables are assigned the value {query}, they are: "},
    "common_words_extraction": {"tokens_to_generate": 12, "template": "Words:\n{context}\nQuestion: common?",
                                "answer_prefix": " Answer: the words are:"},
    "freq_words_extraction": {"tokens_to_generate": 6, "template": "Coded text. {context}\nQuestion: top three?",
                              "answer_prefix": " Answer: the words are:"},
    "qa": {"tokens_to_generate": 4, "template": "Documents.\n\n{context}\n\nQuestion: {query}",
           "answer_prefix": " Answer:"},
}
CONFIGS = {  # RULER's synthetic.yaml
    "niah_single_1": {"task": "niah", "args": {"type_haystack": "repeat", "type_needle_k": "words",
                                               "type_needle_v": "numbers"}},
    "niah_single_2": {"task": "niah", "args": {"type_haystack": "essay", "type_needle_k": "words",
                                               "type_needle_v": "numbers"}},
    "niah_single_3": {"task": "niah", "args": {"type_haystack": "essay", "type_needle_k": "words",
                                               "type_needle_v": "uuids"}},
    "niah_multikey_1": {"task": "niah", "args": {"type_haystack": "essay", "num_needle_k": 4}},
    "niah_multikey_2": {"task": "niah", "args": {"type_haystack": "needle"}},
    "niah_multikey_3": {"task": "niah", "args": {"type_haystack": "needle", "type_needle_k": "uuids",
                                                 "type_needle_v": "uuids"}},
    "niah_multivalue": {"task": "niah", "args": {"type_haystack": "essay", "num_needle_v": 4}},
    "niah_multiquery": {"task": "niah", "args": {"type_haystack": "essay", "num_needle_q": 4}},
    "vt": {"task": "variable_tracking", "args": {"num_chains": 1, "num_hops": 4}},
    "cwe": {"task": "common_words_extraction", "args": {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}},
    "fwe": {"task": "freq_words_extraction", "args": {"alpha": 2.0}},
    "qa_1": {"task": "qa", "args": {"dataset": "squad"}},
    "qa_2": {"task": "qa", "args": {"dataset": "hotpotqa"}},
}


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "."


def tiny_ruler() -> RulerData:
    rng = random.Random(0)
    essay = " ".join(_sentence(rng) for _ in range(200))
    squad = {"data": [{"paragraphs": [
        {"context": f"Paragraph {a}{p}: " + _sentence(rng) * 3,
         "qas": [{"question": f"Where is thing {a}{p}?", "answers": [{"text": f"place{a}{p}"}], "is_impossible": False},
                 {"question": "Unanswerable?", "answers": [], "is_impossible": True}]}
        for p in range(8)]} for a in range(6)]}
    hotpot = [{"question": f"Is item {i} real?", "answer": "yes" if i % 2 else "no",
               "context": [[f"Title {i}a", [_sentence(rng), _sentence(rng)]], [f"Title {i}b", [_sentence(rng)]]]}
              for i in range(30)]
    nouns = [f"noun{i}" for i in range(400)]
    adjectives = [f"adj{i}" for i in range(20)]
    verbs = [f"verb{i}" for i in range(40)]
    return RulerData(templates=TEMPLATES, configs=CONFIGS, essay=essay, nouns=nouns, adjectives=adjectives,
                     verbs=verbs, qa_sources={"squad": lambda: squad, "hotpotqa": lambda: hotpot})


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level: every word, number, uuid piece and punctuation mark is one token (unknown words -> [UNK])."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    for w in WORDS + [w.capitalize() for w in WORDS]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def test_regex_sentence_splitter():
    text = 'It rained. "Then it stopped," she said! Did it? Yes. 3 cats came.  The end'
    assert split_sentences(text) == ["It rained.", '"Then it stopped," she said!', "Did it?", "Yes.", "3 cats came.",
                                     "The end"]
    assert split_sentences("He said \"stop.\" Then he left. e.g. this stays") == [
        'He said "stop."', "Then he left. e.g. this stays"]
    assert split_sentences("") == []


def test_string_match_is_rulers_metric():
    # string_match_all: share of references in the prediction; string_match_part: any (both case-insensitive)
    assert string_match("The numbers are 123 and 456.", ["123", "456", "789"], "all") == pytest.approx(2 / 3)
    assert string_match("The numbers are 123 and 456.", ["123", "456", "789"], "part") == 1.0
    assert string_match("ABC-def", ["abc-DEF"], "all") == 1.0
    assert string_match("  \x00 42\x1f ", ["42"], "all") == 1.0
    assert string_match(None, ["x"], "part") == 0.0
    with pytest.raises(ValueError, match="metric='some'"):
        string_match("x", ["x"], "some")
    with pytest.raises(ValueError, match="at least one reference"):
        string_match("x", [], "all")


def test_zeta():
    assert zeta(2.0) == pytest.approx(math.pi ** 2 / 6, abs=1e-10)
    assert zeta(4.0) == pytest.approx(math.pi ** 4 / 90, abs=1e-12)
    with pytest.raises(ValueError, match="alpha=1"):
        zeta(1)


def test_length_label():
    assert (length_label(4096), length_label(8192), length_label(1000)) == ("4k", "8k", "1000")


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_every_subtask_fits_and_contains_its_answer(subtask, tokenizer):
    data = tiny_ruler()
    length = 1200  # vt's one-shot example alone is fitted to 500 tokens, as RULER does
    examples = build_ruler_examples(tokenizer, data, [subtask], [length], 2, seed=1)
    assert len(examples) == 2
    for ex in examples:
        new = ex["max_new_tokens"]
        assert new == TEMPLATES[CONFIGS[subtask]["task"]]["tokens_to_generate"]
        # fits the context with the tokens to generate, and fills most of it
        assert len(ex["prompt"]) + new <= length
        assert len(ex["prompt"]) + new > 0.8 * length, (subtask, len(ex["prompt"]))
        assert ex["metric"] == ("part" if subtask.startswith("qa") else "all")
        assert ex["references"]
    # deterministic
    again = build_ruler_examples(tokenizer, data, [subtask], [length], 2, seed=1)
    assert [e["prompt"] for e in again] == [e["prompt"] for e in examples]


def _texts(subtask: str, length: int = 600):
    """The generated (user, prefix, references) of a subtask, decoded from the generator directly."""
    from squeezekv.eval import ruler

    data = tiny_ruler()
    base = TEMPLATES[CONFIGS[subtask]["task"]]
    return ruler._generator(data, CONFIGS[subtask]["task"], dict(CONFIGS[subtask]["args"]), base["template"],
                            base["answer_prefix"], length, 0, None if subtask != "vt" else _ws_tokenizer())


def _ws_tokenizer():
    return lambda text, add_special_tokens=False: {"input_ids": text.split()}


def test_niah_needles_and_singular_wording():
    gen = _texts("niah_single_2")
    g = gen(100, random.Random(0))
    (value,) = g.references
    assert value.isdigit() and len(value) == 7
    assert f"is: {value}." in g.user
    assert g.user.startswith("A special magic number is hidden.")  # singular, as RULER for one needle and one query
    assert g.prefix.startswith(" The special magic number for ")
    multi = _texts("niah_multivalue")(100, random.Random(0))
    assert len(multi.references) == 4 and all(f"is: {v}." in multi.user for v in multi.references)
    assert multi.user.startswith("Some special magic numbers")
    queries = _texts("niah_multiquery")(100, random.Random(0))
    assert ", and " in queries.prefix and len(queries.references) == 4


def test_vt_chain_and_one_shot_example():
    gen = _texts("vt")
    g = gen(20, random.Random(0))
    names = g.references
    assert len(names) == 5 and all(len(n) == 5 for n in names)
    value = g.prefix.split("the value ")[1].split(",")[0]
    assert f"VAR {names[0]} = {value}" in g.user
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}" in g.user
    shot, task = g.user.split("\n\nTrack.", 1)[0], g.user
    assert shot.startswith("Track.") and "they are: " in shot  # the one-shot example, answered
    assert task.count("Question: Find all variables") == 2


def test_cwe_answer_is_the_most_common_words():
    g = _texts("cwe")(30, random.Random(0))
    listed = g.user.rsplit("Words:\n", 1)[1].split("\nQuestion")[0]
    words = [w for i, w in enumerate(listed.split()) if i % 2 == 1]
    counts = {w: words.count(w) for w in set(words)}
    assert set(sorted(counts, key=lambda w: -counts[w])[:10]) == set(g.references)
    assert len(g.references) == 10
    # short contexts (< 4096): 6 repeats of the common words, 1 of the others
    assert all(counts[w] == 6 for w in g.references) and all(c == 1 for w, c in counts.items() if w not in g.references)


def test_qa_gold_documents_are_in_the_context():
    gen = _texts("qa_1")
    gen.index = 4
    g = gen(5, random.Random(0))
    qas, docs = tiny_ruler().qa("squad")
    assert g.references == qas[4]["outputs"]
    assert docs[qas[4]["context"][0]] in g.user
    assert g.user.count("Document ") == 5
    assert len(qas) == 48  # the unanswerable questions are left out, as RULER's read_squad


def test_ruler_score_and_unknown_subtask():
    ex = Example(id="x", task="ruler", subset="4k/niah_multivalue", kind="generate", prompt=(1,),
                 meta={"references": ["11", "22"], "metric": "all"})
    assert score(ex, "11 and 33", None) == {"ruler": 0.5}
    with pytest.raises(ValueError, match="ruler_subtasks"):
        TaskOptions(ruler_subtasks=("niah_single_9",)).validate()
    with pytest.raises(ValueError, match="ruler_lengths"):
        TaskOptions(ruler_lengths=(100,)).validate()


def test_fingerprint_ignores_ruler_options_without_ruler():
    a = GridConfig(tasks=("needle",), options=TaskOptions(ruler_samples=3))
    b = GridConfig(tasks=("needle",), options=TaskOptions(ruler_samples=7))
    assert a.fingerprint() == b.fingerprint()
    c = GridConfig(tasks=("ruler",), options=TaskOptions(ruler_samples=3))
    d = GridConfig(tasks=("ruler",), options=TaskOptions(ruler_samples=7))
    assert c.fingerprint() != d.fingerprint()


def test_eval_grid_with_ruler(tmp_path, make_model, tokenizer):
    model = make_model("llama", layers=2, vocab_size=len(tokenizer), max_position_embeddings=1024)
    opts = TaskOptions(ruler_subtasks=("niah_single_1", "qa_1"), ruler_lengths=(300, 400), ruler_samples=2)
    cfg = GridConfig(model="tiny", tasks=("ruler",), methods=("window",), allocations=("uniform",), budgets=(0.5,),
                     options=opts)
    out = tmp_path / "run"
    evaluate(cfg, out, sources=Sources(ruler=tiny_ruler()), loaded=(model, tokenizer), progress=False)
    records = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2 * 2  # 2 cells x 2 subtasks x 2 lengths x 2 examples
    assert {r["subset"] for r in records} == {"300/niah_single_1", "300/qa_1", "400/niah_single_1", "400/qa_1"}
    for r in records:
        assert r["scores"]["ruler"] == string_match(r["answer"], r["meta"]["references"], r["meta"]["metric"])
    import csv

    rows = list(csv.DictReader(open(out / "summary.csv")))
    subsets = {r["subset"] for r in rows if r["task"] == "ruler"}
    assert {"300/all", "400/all", "all", "300/qa_1"} <= subsets
    full300 = [r for r in rows if r["subset"] == "300/all" and r["cell"] == "full"][0]
    per = [float(r["value"]) for r in rows if r["cell"] == "full" and r["subset"] in ("300/niah_single_1", "300/qa_1")]
    assert float(full300["value"]) == pytest.approx(sum(per) / 2)  # RULER's average over subtasks


@pytest.mark.real_weights
def test_real_ruler_data_builds_every_subtask():
    """The RULER wheel's own templates, configurations and data (when extracted in the cache folder; nothing is
    downloaded here), with the default model's tokenizer if it is converted."""
    try:
        data = load_ruler(allow_download=False)
    except FileNotFoundError:
        pytest.skip("RULER data not in the cache folder")
    from squeezekv import assets

    target = assets.cache_dir() / "models" / assets.DEFAULT_MODEL_NAME
    if not (target / "tokenizer_config.json").exists():
        pytest.skip("default model not converted")
    from transformers import AutoTokenizer

    assert tuple(data.configs) == SUBTASKS
    tok = AutoTokenizer.from_pretrained(target)
    examples = build_ruler_examples(tok, data, SUBTASKS, [4096], 1)
    assert len(examples) == 13
    for ex in examples:
        assert 0.85 * 4096 < len(ex["prompt"]) + ex["max_new_tokens"] <= 4096
