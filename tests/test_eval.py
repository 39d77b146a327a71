"""`squeezekv eval` end to end on a tiny random model with tiny texts built here (no download): records, summary,
plots and HTML written; a second run recomputes nothing; bad input fails before any compute."""

from __future__ import annotations

import json
import random

import pytest

from squeezekv.cli import main
from squeezekv.eval import GridConfig, Sources, TaskOptions, evaluate
from squeezekv.eval import grid as grid_mod
from squeezekv.eval.data import QARecord, parse_instruction_example
from squeezekv.eval.scoring import bootstrap_ci, exact_match, token_f1

WORDS = ("the cat sat on a mat and we saw many quiet ships under bright stars while old friends "
         "wrote long letters about rivers hills towns roads music bread").split()


def _text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + ".")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def tiny_sources():
    essays = [(f"essay{i}", _text(i, 60)) for i in range(3)]
    qa = []
    for sub in ("quoref", "drop"):
        for i in range(4):
            qa.append(QARecord(sub, i, _text(100 + i, 6), "Who saw the ships?", ("old friends",), "test"))
    return Sources(essays=essays, qa=qa, docs={"essays": essays})


def _cfg(**kw) -> GridConfig:
    opts = TaskOptions(needle_lengths=(100,), needle_depths=(0.0, 1.0), needles=2, needle_new_tokens=4,
                       qa_length=120, qa_per_subtask=1, qa_new_tokens=4, ppl_sources=("essays",), ppl_docs=2,
                       ppl_prefix=48, ppl_tokens=16)
    base = dict(model="tiny", tasks=("needle", "qa", "ppl"), methods=("window", "snapkv"),
                allocations=("uniform", "pyramid", "squeeze"), budgets=(0.3, 0.6),
                method_params={"snapkv": {"window": 8}}, options=opts, skip_infeasible=True)
    base.update(kw)
    return GridConfig(**base)


def test_smoke_grid_records_plots_resume(tmp_path, make_model, tiny_tokenizer, tiny_sources, monkeypatch):
    model = make_model("llama", layers=3, vocab_size=len(tiny_tokenizer), max_position_embeddings=512)
    out = tmp_path / "run"
    res = evaluate(_cfg(), out, sources=tiny_sources, loaded=(model, tiny_tokenizer), progress=False)
    records = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    # pyramid gives its top layer base/20 tokens, below snapkv's window of 8: snapkv shrinks the window to fit, so
    # no cell is skipped (skip_infeasible only skips policies that declare a minimum budget)
    assert config["skipped_cells"] == []
    cells = {r["cell"] for r in records}
    assert "full" in cells and "window/squeeze/0.3" in cells and "snapkv/uniform/0.6" in cells
    assert "snapkv/pyramid/0.3" in cells
    n_examples = 4 + 4 + 2  # needle 1 length x 2 depths x 2 needles; qa 2 subtasks x 1 x 2 placements; ppl 2 docs
    assert len(records) == len(cells) * n_examples
    r0 = records[0]
    assert {"config", "versions", "scores", "kv_bytes_after_prefill"} <= set(r0)
    assert r0["versions"]["transformers"]
    # the compressed caches really hold fewer bytes than the full one
    full_bytes = {r["example_id"]: r["kv_bytes_after_prefill"] for r in records if r["cell"] == "full"}
    small = [r for r in records if r["cell"] == "window/uniform/0.3"]
    assert all(r["kv_bytes_after_prefill"] < 0.5 * full_bytes[r["example_id"]] for r in small)
    for name in ("summary.csv", "comparisons.csv", "summary.md", "report.html", "quality_needle_all_retrieval.png",
                 "needle_heatmap_budget0.3.png", "quality_ppl_essays_nll.png"):
        assert (out / name).stat().st_size > 0, name
    html = (out / "report.html").read_text()
    assert "<img src='quality_qa_all_f1.png'" in html and "full" in html
    rows = [r for r in res["summary"] if r["task"] == "ppl" and r["cell"] == "full"]
    assert rows and rows[0]["n"] == 2 and rows[0]["ci_low"] <= rows[0]["value"] <= rows[0]["ci_high"]
    # resume: nothing is recomputed
    calls = []
    monkeypatch.setattr(grid_mod, "generate", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(grid_mod, "continuation_nll", lambda *a, **k: calls.append(1))
    evaluate(_cfg(), out, sources=tiny_sources, loaded=(model, tiny_tokenizer), progress=False)
    assert calls == []
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)
    # other task settings in the same folder are refused instead of mixed
    with pytest.raises(ValueError, match="other settings"):
        evaluate(_cfg(options=TaskOptions(needle_lengths=(90,), needle_depths=(0.5,), needles=1, ppl_docs=1,
                                          ppl_prefix=48, ppl_tokens=16, ppl_sources=("essays",), qa_length=100)),
                 out, sources=tiny_sources, loaded=(model, tiny_tokenizer), progress=False)


def test_chunked_prefill_cells(tmp_path, make_model, tiny_tokenizer, tiny_sources):
    """With --prefill-chunk the compressed cells prefill in chunks (recorded per record; the full cache never does):
    the positions-only window keeps the same bytes as in a one-pass grid, and the full cell's scores are unchanged."""
    model = make_model("llama", layers=3, vocab_size=len(tiny_tokenizer), max_position_embeddings=512)
    one = evaluate(_cfg(methods=("window",), allocations=("uniform",), method_params={}), tmp_path / "one",
                   sources=tiny_sources, loaded=(model, tiny_tokenizer), progress=False)
    chunked = evaluate(_cfg(methods=("window",), allocations=("uniform",), method_params={}, prefill_chunk=16),
                       tmp_path / "ch", sources=tiny_sources, loaded=(model, tiny_tokenizer), progress=False)
    recs = [json.loads(l) for l in (tmp_path / "ch" / "results.jsonl").read_text().splitlines()]
    assert {r["config"]["prefill_chunk"] for r in recs if r["cell"] != "full"} == {16}
    assert {r["config"]["prefill_chunk"] for r in recs if r["cell"] == "full"} == {None}
    ref = {(r["cell"], r["example_id"]): r for r in
           (json.loads(l) for l in (tmp_path / "one" / "results.jsonl").read_text().splitlines())}
    for r in recs:
        assert r["kv_bytes_after_prefill"] == ref[(r["cell"], r["example_id"])]["kv_bytes_after_prefill"]
        if r["cell"] == "full":
            assert r["scores"] == ref[(r["cell"], r["example_id"])]["scores"]
    assert one["summary"] and chunked["summary"]


def test_full_cache_nll_matches_one_forward(make_model, tiny_tokenizer):
    """Prefill + continuation in a second pass equals one forward over the whole document (full cache)."""
    import torch

    model = make_model("llama", layers=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=512)
    ids = tiny_tokenizer(_text(7, 8), add_special_tokens=False)["input_ids"][:40]
    from transformers import DynamicCache

    from squeezekv import dynamic_cache_nbytes

    nll, held = grid_mod.continuation_nll(model, ids[:30], ids[30:], lambda: DynamicCache(config=model.config),
                                          dynamic_cache_nbytes, "cpu")
    logits = model(input_ids=torch.tensor([ids])).logits[0, 29:39]
    ref = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[30:])[:, None]).mean()
    assert abs(nll - float(ref)) < 1e-4
    assert held > 0


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(tasks=("needle", "nope")), "unknown task 'nope'"),
        (dict(methods=("window", "nope")), "unknown method 'nope'"),
        (dict(allocations=("nope",)), "unknown allocation 'nope'"),
        (dict(budgets=(1.5,)), "budget 1.5 is out of range"),
        (dict(budgets=(0,)), "budget 0 is out of range"),
        (dict(budgets=(1.0,)), "budget 1.0 is out of range"),
        (dict(method_params={"h2o": {"recent_ratio": 0.5}}), "not in the grid"),
        (dict(methods=("none",)), "method 'none' .* needs a channel or cross-layer method"),
        (dict(channels=("nope",)), "unknown channel method 'nope'"),
        (dict(crosslayers=("nope",)), "unknown cross-layer method 'nope'"),
        (dict(prefill_chunk=0), "prefill_chunk=0 is out of range"),
        (dict(dtype="int8"), "dtype='int8' is not supported"),
    ],
)
def test_bad_input_fails_before_compute(kw, fragment, tmp_path, monkeypatch):
    def boom(*a, **k):  # loading a model is compute: must not be reached
        raise AssertionError("model loaded despite bad input")

    monkeypatch.setattr("squeezekv.assets.load_model", boom)
    with pytest.raises(ValueError, match=fragment):
        evaluate(_cfg(**kw), tmp_path / "x", sources=Sources(essays=[("e", "x")], qa=[], docs={}), progress=False)


def test_missing_linux_doc_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("squeezekv.eval.data.LINUX_DOC_ROOT", tmp_path / "absent")
    monkeypatch.setattr("squeezekv.assets.load_model", lambda *a, **k: pytest.fail("model loaded"))
    rc = main(["eval", "--tasks", "ppl", "--ppl-sources", "linux-doc", "--out", str(tmp_path / "o"),
               "--no-progress"])
    assert rc == 2
    assert "apt-get install linux-doc-6.1" in capsys.readouterr().err


def test_cli_eval_rejects_bad_budget_without_traceback(tmp_path, capsys):
    assert main(["eval", "--budgets", "0.2,2.5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "budget 2.5 is out of range" in err and "Traceback" not in err


def test_scoring():
    assert exact_match("The Catherine.", ["Catherine"]) == 1.0
    assert exact_match("A, B", ["A, B"], articles=False) == 1.0
    assert token_f1("Catherine Hickson", ["Catherine"]) == pytest.approx(2 / 3)
    assert token_f1("nothing", ["Catherine"]) == 0.0
    lo, hi = bootstrap_ci([0.0, 1.0] * 20)
    assert lo < 0.5 < hi and 0.25 < lo and hi < 0.75
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])


def test_parse_instruction_example():
    ex = {"input": "Passage: Alice met Bob. She smiled. \nQuestion: Who smiled?", "target": ["Alice."]}
    rec = parse_instruction_example("subtask002_quoref_answer_generation", 3, ex)
    assert rec.subtask == "quoref" and rec.passage == "Alice met Bob. She smiled." and rec.question == "Who smiled?"
    assert rec.answers == ("Alice",) and rec.split in ("dev", "test") and not rec.options
    assert parse_instruction_example("x", 0, {"input": "no question here", "target": ["a"]}) is None


def _rec(cell: str, method: str, alloc: str, budget: float, ex: str, value: float) -> dict:
    return {"cell": cell, "method": method, "allocation": alloc, "budget": budget, "task": "needle", "subset": "",
            "example_id": ex, "scores": {"retrieval": value}, "kv_bytes_after_prefill": 10 if method != "full" else 50,
            "meta": {}}


def test_summary_comparisons_and_within_one_point():
    from squeezekv.eval.report import paired_comparisons, summarize, within_one_point

    recs = []
    for i in range(10):
        ex = f"e{i}"
        recs.append(_rec("full", "full", "-", 1.0, ex, 1.0))
        recs.append(_rec("h2o/uniform/0.2", "h2o", "uniform", 0.2, ex, 0.0))
        recs.append(_rec("h2o/squeeze/0.2", "h2o", "squeeze", 0.2, ex, 1.0 if i < 8 else 0.0))
        recs.append(_rec("h2o/uniform/0.5", "h2o", "uniform", 0.5, ex, 1.0))
        recs.append(_rec("h2o/squeeze/0.5", "h2o", "squeeze", 0.5, ex, 1.0))
    summary = summarize(recs)
    full = next(r for r in summary if r["cell"] == "full")
    assert (full["n"], full["value"], full["full_value"]) == (10, 100.0, 100.0)
    sq = next(r for r in summary if r["cell"] == "h2o/squeeze/0.2")
    assert sq["value"] == pytest.approx(80.0) and sq["delta_vs_full"] == pytest.approx(-20.0)
    assert sq["kv_bytes_ratio"] == pytest.approx(0.2)
    comp = {(r["allocation"], r["budget"]): r for r in paired_comparisons(recs)}
    assert comp[("squeeze", 0.2)]["gain"] == pytest.approx(80.0) and comp[("squeeze", 0.2)]["verdict"] == "better"
    assert comp[("squeeze", 0.5)]["verdict"] == "no clear difference"
    within = {r["allocation"]: r["budget_within_1"] for r in within_one_point(summary)}
    assert within == {"uniform": 0.5, "squeeze": 0.5}


def test_kvpress_side_validates_before_compute(tmp_path):
    from squeezekv.eval import kvpress_side
    from squeezekv.eval.kvpress_worker import make_press

    with pytest.raises(ValueError, match="is not a file"):
        _cfg(kvpress_python=str(tmp_path / "nope" / "python")).validate()
    py = tmp_path / "python"
    py.write_text("")
    with pytest.raises(ValueError, match="unknown kvpress press 'nope'"):
        _cfg(kvpress_python=str(py), kvpress_presses=("snapkv", "nope")).validate()
    with pytest.raises(ValueError, match="unknown kvpress press"):
        make_press("nope", 0.2)
    keys = [k for k, _, _ in kvpress_side.cells(("snapkv",), (0.2, 0.5))]
    assert keys == ["kvpress:full", "kvpress:snapkv/kvpress/0.2", "kvpress:snapkv/kvpress/0.5"]


def test_full_cache_check_counts_differences():
    from squeezekv.eval.report import full_cache_check

    base = {"task": "ppl", "versions": {"transformers": "x"}, "answer": None}
    recs = [{**base, "cell": "full", "example_id": "a", "scores": {"nll": 2.0}},
            {**base, "cell": "kvpress:full", "example_id": "a", "scores": {"nll": 2.25}}]
    (row,) = full_cache_check(recs)
    assert row["n"] == 1 and row["identical_scores"] == 0 and row["max_abs_nll_diff"] == pytest.approx(0.25)


FAKE_WORKER = '''
import argparse, json, sys
ap = argparse.ArgumentParser()
for a in ("--model", "--examples", "--jobs", "--out", "--device", "--dtype"):
    ap.add_argument(a)
args = ap.parse_args()
jobs = [json.loads(l) for l in open(args.jobs)]
with open(args.out, "a") as fh:
    for i, j in enumerate(jobs):
        if i == 2 and "FAIL" in open(args.model).read():
            sys.exit(3)  # a worker that dies after two runs
        fh.write(json.dumps({**j, "answer": "7291", "nll": 1.0, "kv_bytes_after_prefill": 1, "seconds": 0.0,
                             "versions": {"transformers": "5.2.0"}}) + "\\n")
'''


def test_kvpress_orchestration_records_and_resumes(tmp_path, monkeypatch):
    """The worker's raw results become scored records; a worker that dies keeps what it finished."""
    import sys

    from squeezekv.eval import kvpress_side
    from squeezekv.eval.grid import read_records, score
    from squeezekv.eval.tasks import Example

    worker = tmp_path / "worker.py"
    worker.write_text(FAKE_WORKER)
    monkeypatch.setattr(kvpress_side, "WORKER", worker)
    model = tmp_path / "model"
    model.write_text("FAIL")
    examples = [Example(id=f"needle/{i}", task="needle", subset="", kind="generate", prompt=(1, 2, 3),
                        meta={"key": "7291"}, max_new_tokens=2) for i in range(2)]
    results = tmp_path / "results.jsonl"
    args = (sys.executable, str(model), ("snapkv",), (0.2,), examples)
    with pytest.raises(RuntimeError, match="exit code 3"):
        kvpress_side.run(*args, set(), score, {}, results)
    assert len(read_records(results)) == 2
    model.write_text("ok")
    done = {(r["cell"], r["example_id"]) for r in read_records(results)}
    assert kvpress_side.run(*args, done, score, {}, results) == 2
    recs = read_records(results)
    assert len(recs) == 4 == len({(r["cell"], r["example_id"]) for r in recs})
    assert all(r["scores"] == {"retrieval": 1.0} and r["allocation"] == "kvpress" for r in recs)


def test_full_value_uses_the_cells_examples_and_small_n_gets_no_verdict():
    from squeezekv.eval.report import paired_comparisons, summarize

    recs = [_rec("full", "full", "-", 1.0, "a", 1.0), _rec("full", "full", "-", 1.0, "b", 0.0),
            _rec("h2o/uniform/0.2", "h2o", "uniform", 0.2, "a", 1.0),
            _rec("h2o/squeeze/0.2", "h2o", "squeeze", 0.2, "a", 0.0)]
    row = next(r for r in summarize(recs) if r["cell"] == "h2o/uniform/0.2")
    assert row["full_value"] == 100.0 and row["delta_vs_full"] == 0.0  # full on example a only, not on a and b
    (comp,) = paired_comparisons(recs)
    assert comp["gain"] == -100.0 and comp["verdict"].startswith("n < 5")


def test_channel_and_crosslayer_cells_are_labelled_and_composed():
    """--channels/--crosslayers multiply the grid; 'none' (no eviction) gets one cell per channel/cross-layer method
    and none alone; records and reports see the composed label."""
    cfg = GridConfig(model="tiny", tasks=("ppl",), methods=("none", "window"), allocations=("uniform",),
                     budgets=(0.3,), channels=("none", "kivi"), crosslayers=("none",),
                     channel_params={"kivi": {"bits": 4}})
    cfg.validate()
    keys = [c.key for c in cfg.cells()]
    assert keys == ["full", "window/uniform/0.3", "none+kivi/-/1", "window+kivi/uniform/0.3"]
    with pytest.raises(ValueError, match="not in the grid"):
        GridConfig(model="tiny", tasks=("ppl",), methods=("window",), budgets=(0.3,),
                   channel_params={"kivi": {"bits": 2}}).validate()


def test_channel_labels_run_one_method_under_several_settings(tmp_path, make_model, tiny_tokenizer, tiny_sources):
    """``kivi2=kivi,kivi4=kivi``: two cells of one registered method, each built with its own parameters (the
    4-bit cache is larger than the 2-bit one on the same example) and recorded under its label."""
    cfg = _cfg(tasks=("ppl",), methods=("none",), allocations=("uniform",), budgets=(0.3,), method_params={},
               channels=("kivi2=kivi", "kivi4=kivi"),
               channel_params={"kivi2": {"bits": 2, "residual": 0, "group_size": 16},
                               "kivi4": {"bits": 4, "residual": 0, "group_size": 16}})
    cfg.validate()
    assert [c.key for c in cfg.cells()] == ["full", "none+kivi2/-/1", "none+kivi4/-/1"]
    assert cfg.aliases == {"kivi2": "kivi", "kivi4": "kivi"}
    model = make_model("llama", layers=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=512)
    evaluate(cfg, tmp_path / "run", sources=tiny_sources, loaded=(model, tiny_tokenizer), progress=False)
    recs = [json.loads(l) for l in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    held = {}
    for r in recs:
        held.setdefault(r["cell"], []).append(r["kv_bytes_after_prefill"])
        if r["cell"] != "full":
            assert r["config"]["channel_method"] == "kivi"
            assert r["config"]["channel_params"]["bits"] == (2 if "kivi2" in r["cell"] else 4)
    assert all(a < b < f for a, b, f in zip(held["none+kivi2/-/1"], held["none+kivi4/-/1"], held["full"]))
    for bad, fragment in ((("x=",), "must look like label=method"), (("a=kivi", "a=coupled"), "names both"),
                          (("a=nope",), "unknown channel method 'nope'")):
        with pytest.raises(ValueError, match=fragment):
            GridConfig(model="tiny", tasks=("ppl",), methods=("none",), channels=bad).validate()
