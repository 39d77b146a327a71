"""The decode runtime in the benchmarks: the runtime_decode suite's kvpress SnapKV case and the runtime / kvpress
ratios (runner, page), kvpress's carried environment (the ``datasets`` stand-in), and ``squeezekv bench`` decoding
through :class:`~squeezekv.runtime.runtime.DecodeRuntime`."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.pages import render_suite  # noqa: E402
from benchmarks.run import run_suite  # noqa: E402
from benchmarks.suite import parse_suite  # noqa: E402

KVPRESS_TOKENS_PER_S = 1000.0

FAKE_WORKER = f"""
import json, sys
job = json.load(open(sys.argv[2]))
rows = [{{"batch": b, "context": job["context"], "kept_tokens_per_layer": int(job["context"] * job["budget"]),
          "ms_per_step": 1e3 * b / {KVPRESS_TOKENS_PER_S}, "tokens_per_s": {KVPRESS_TOKENS_PER_S}}}
        for b in job["batches"]]
json.dump({{"rows": rows, "versions": {{"kvpress": "fake"}}, "job": job}}, open(sys.argv[3], "w"))
"""


def _fake_kvpress_python(tmp_path: Path) -> str:
    """An 'interpreter' for the kvpress_decode kind that ignores the worker and writes fixed rows (and the job)."""
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    py = tmp_path / "fakepy"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{worker}" "$@"\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return str(py)


def _tiny_runtime_suite(tmp_path: Path, python: str | None) -> Path:
    """runtime_decode.json at a CPU size: the micro model, a 128-token context, batches 1 and 2, one timed step."""
    raw = json.loads((ROOT / "benchmarks" / "suites" / "runtime_decode.json").read_text())
    raw["model"], raw["device"] = {"random": "micro", "dtype": "float32"}, "cpu"
    raw["defaults"] = {"context": 128, "steps": 2, "warmup": 1, "reps": 1}
    for case in raw["cases"]:
        if "batches" in case:
            case["batches"] = [1, 2]
        if case["kind"] == "kvpress_decode" and python is not None:
            case["python"] = python
    path = tmp_path / "runtime_decode.json"
    path.write_text(json.dumps(raw))
    return path


def test_runtime_decode_suite_has_kvpress_snapkv_at_its_shape() -> None:
    raw = json.loads((ROOT / "benchmarks" / "suites" / "runtime_decode.json").read_text())
    suite = parse_suite(raw, "runtime_decode")
    cases = {c.name: c for c in suite.cases}
    kv = cases["kvpress-snapkv"]
    runtime = cases["runtime-snapkv"]
    assert kv.kind == "kvpress_decode" and kv.get("press") == "SnapKVPress"
    assert (kv.get("context"), kv.get("budget")) == (8192, runtime.get("cache")["budget"]) == (8192, 0.2)
    assert kv.get("batches") == [1, 16, 64, 256] == runtime.get("batches")
    assert (kv.get("steps"), kv.get("warmup"), kv.get("reps")) == (runtime.get("steps"), runtime.get("warmup"),
                                                                   runtime.get("reps"))
    assert runtime.get("compare") == ["kvpress-snapkv"]


def test_compare_must_name_another_case() -> None:
    case = {"name": "rt", "kind": "runtime_decode", "cache": "method=snapkv budget=0.2", "compare": ["nope"]}
    with pytest.raises(ValueError, match=r"case 'rt': compare names 'nope', which is not another case"):
        parse_suite({"model": {"random": "micro"}, "device": "cpu", "cases": [case]}, "s")
    with pytest.raises(TypeError, match=r"compare='kv' must be a list of case names"):
        parse_suite({"model": {"random": "micro"}, "device": "cpu", "cases": [{**case, "compare": "kv"}]}, "s")


def test_runtime_rows_get_kvpress_ratios_and_the_page_shows_them(tmp_path: Path) -> None:
    suite = _tiny_runtime_suite(tmp_path, _fake_kvpress_python(tmp_path))
    path = run_suite(str(suite), tmp_path / "out", cases=["kvpress-snapkv", "runtime-snapkv"], quiet=True)
    report = json.loads(path.read_text())
    kv_rows = report["cases"]["kvpress-snapkv"]["rows"]
    assert [r["batch"] for r in kv_rows] == [1, 2]
    rt_rows = report["cases"]["runtime-snapkv"]["rows"]
    assert [r["batch"] for r in rt_rows] == [1, 2]
    for r in rt_rows:
        assert r["tokens_per_s_vs_kvpress-snapkv"] == r["tokens_per_s"] / KVPRESS_TOKENS_PER_S
    assert report["versions"]["kvpress_env"] == {"kvpress": "fake"}
    page = "\n".join(render_suite(report))
    assert "`*_vs_kvpress-snapkv`: over kvpress-snapkv" in page
    header = next(line for line in page.splitlines() if "tokens_per_s_vs_kvpress-snapkv" in line)
    cols = [c.strip() for c in header.strip("|").split("|")]
    row1 = next(line for line in page.splitlines() if line.startswith("| 1 | 128 | 16 |"))
    vals = [c.strip() for c in row1.strip("|").split("|")]
    ratio = rt_rows[0]["tokens_per_s"] / KVPRESS_TOKENS_PER_S
    from benchmarks.pages import fmt

    assert vals[cols.index("tokens_per_s_vs_kvpress-snapkv")] == fmt(ratio)


@pytest.mark.skipif(not os.environ.get("SQUEEZEKV_KVPRESS_PYTHON"),
                    reason="set SQUEEZEKV_KVPRESS_PYTHON to kvpress's environment (benchmarks/make_kvp_env.sh)")
def test_real_kvpress_worker_on_cpu(tmp_path: Path) -> None:
    """The real worker in kvpress's environment keeps the budget's tokens per layer (CPU, micro model)."""
    suite = _tiny_runtime_suite(tmp_path, None)
    path = run_suite(str(suite), tmp_path / "out", cases=["kvpress-snapkv", "runtime-snapkv"], quiet=True)
    report = json.loads(path.read_text())
    kv_rows = report["cases"]["kvpress-snapkv"]["rows"]
    assert [r["kept_tokens_per_layer"] for r in kv_rows] == [int(128 * 0.2)] * 2
    assert report["versions"]["kvpress_env"]["kvpress"] == "0.5.5"
    assert all("tokens_per_s_vs_kvpress-snapkv" in r for r in report["cases"]["runtime-snapkv"]["rows"])


def test_datasets_stand_in_raises_naming_itself() -> None:
    spec = importlib.util.spec_from_file_location("kvp_datasets",
                                                  ROOT / "benchmarks" / "kvp_stubs" / "datasets" / "__init__.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(RuntimeError, match=r"datasets is a stub .*load_dataset\('kmfoda/booksum',\)"):
        mod.load_dataset("kmfoda/booksum")
    with pytest.raises(RuntimeError, match=r"datasets.Dataset is not available"):
        mod.Dataset  # noqa: B018


# -- squeezekv bench through the decode runtime -------------------------------------------------------------------

MICRO = json.loads((ROOT / "benchmarks" / "models" / "micro.json").read_text())
CONTEXT, BUDGET, STEPS, WARMUP, REPS = 64, 0.25, 2, 1, 2


def _bench(tmp_path: Path, caches: list, *extra: str) -> dict:
    from squeezekv.cli import main

    cfg = {"model": MICRO, "dtype": "float32", "context": CONTEXT, "budget": BUDGET, "batches": [1, 3],
           "decode_steps": STEPS, "warmup": WARMUP, "reps": REPS, "caches": caches}
    cfg_path, out = tmp_path / "bench.json", tmp_path / "out.json"
    cfg_path.write_text(json.dumps(cfg))
    assert main(["bench", "--config", str(cfg_path), "--out", str(out), "--device", "cpu", "--only", "decode",
                 *extra]) == 0
    return json.loads(out.read_text())


def test_bench_decodes_runtime_capable_caches_through_the_runtime(tmp_path: Path) -> None:
    report = _bench(tmp_path, ["full", "method=snapkv", "method=h2o evict_every=4"])
    rows = {(r["method"], r["batch"]): r for r in report["decode"]}
    assert [(r["method"], r["decoder"]) for r in report["decode"] if r["batch"] == 1] == [
        ("full", "eager"), ("method=snapkv", "runtime"), ("method=snapkv decoder=eager", "eager"),
        ("method=h2o evict_every=4", "runtime"), ("method=h2o evict_every=4 decoder=eager", "eager")]
    m, n = MICRO, int(round(BUDGET * CONTEXT))
    layers, heads, dim = m["num_hidden_layers"], m["num_key_value_heads"], m["head_dim"]
    for b in (1, 3):
        for name, capacity, scores in (("method=snapkv", n + WARMUP + STEPS * REPS, 4),
                                       ("method=h2o evict_every=4", n + 4, 4)):
            rt, eager = rows[(name, b)], rows[(f"{name} decoder=eager", b)]
            assert rt["graph"] is False and rt["tokens_per_s"] == b / (rt["ms_per_step"] / 1e3)
            # the same cache at the same batch: the runtime's requests hold what the eager batch holds
            assert rt["kv_bytes_start"] == eager["kv_bytes_start"]
            slot = layers * heads * capacity * (2 * dim * 4 + 4 + scores) + layers * heads * 4 + 8
            assert rt["pool_bytes"] == (b + 1) * slot  # the pool of b slots (and the scratch row) it decoded
    assert "pool_bytes" not in rows[("full", 1)]


def test_bench_runtime_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    only_runtime = _bench(tmp_path, ["method=window evict_every=4"], "--no-eager-reference")
    assert [(r["method"], r["decoder"]) for r in only_runtime["decode"]] == [("method=window evict_every=4",
                                                                              "runtime")] * 2
    eager = _bench(tmp_path, ["method=window evict_every=4"], "--no-runtime")
    assert [(r["method"], r["decoder"]) for r in eager["decode"]] == [("method=window evict_every=4", "eager")] * 2
    assert all("pool_bytes" not in r for r in eager["decode"])
    from squeezekv.cli import main

    assert main(["bench", "--config", str(tmp_path / "bench.json"), "--out", str(tmp_path / "x.json"), "--device",
                 "cpu"]) == 2
    assert "on the CPU only the decode part runs" in capsys.readouterr().err


def test_runtime_unavailable_names_why() -> None:
    from squeezekv.bench import BenchCache, runtime_unavailable

    class Model:
        class config:  # noqa: N801 - stands in for a model's config
            sliding_window = None
            layer_types = ["full_attention"]

    assert runtime_unavailable(Model, BenchCache.parse("method=snapkv")) is None
    assert runtime_unavailable(Model, BenchCache.parse("full")) == "the full cache decodes eagerly"
    assert "no channel or cross-layer" in runtime_unavailable(Model, BenchCache.parse("method=snapkv channel=kivi"))
    graph = BenchCache.parse({"cache": "method=window evict_every=16", "decoder": "graph"})
    assert runtime_unavailable(Model, graph) == "decoder='graph' is its own path"
    Model.config.layer_types = ["full_attention", "sliding_attention"]
    assert "every layer is full attention" in runtime_unavailable(Model, BenchCache.parse("method=snapkv"))


def test_a_compiled_case_decodes_every_batch_on_one_runtime(tmp_path: Path) -> None:
    """runtime_decode with compile: one runtime (one compilation) for the case's batches, its pool sized for the
    largest; each batch joins and leaves it (CPU, micro model)."""
    raw = {"model": {"random": "micro", "dtype": "float32"}, "device": "cpu",
           "defaults": {"context": 64, "steps": 2, "warmup": 1, "reps": 1},
           "cases": [{"name": "rt", "kind": "runtime_decode", "cache": "method=h2o budget=0.25 allocation=uniform",
                      "compile": True, "batches": [2, 3], "chunk": 4}]}
    suite = tmp_path / "compiled.json"
    suite.write_text(json.dumps(raw))
    report = json.loads(run_suite(str(suite), tmp_path / "out", quiet=True).read_text())
    rows = report["cases"]["rt"]["rows"]
    assert [r["batch"] for r in rows] == [2, 3] and all(r["compile"] for r in rows)
    assert rows[0]["pool_bytes"] == rows[1]["pool_bytes"] == 4 * rows[0]["slot_bytes"]  # 3 slots + scratch
    assert rows[1]["kv_bytes_start"] == 3 * rows[0]["kv_bytes_start"] // 2
