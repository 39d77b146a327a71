"""The benchmark runner (benchmarks/run.py): every committed suite loads and validates, bad configs fail naming the
bad value, and the tiny CPU suite runs end to end writing one JSON with the config and versions."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.kinds import KINDS  # noqa: E402
from benchmarks.run import run_suite  # noqa: E402
from benchmarks.suite import load_suite, parse_cache, parse_suite, suite_names  # noqa: E402

MICRO = json.loads((ROOT / "benchmarks" / "models" / "micro.json").read_text())


def _suite(cases: list[dict], **extra: object) -> dict:
    return {"model": {"random": "micro", "dtype": "float32"}, "device": "cpu", "cases": cases, **extra}


@pytest.mark.parametrize("name", suite_names())
def test_every_committed_suite_validates(name: str) -> None:
    suite = load_suite(name)
    assert suite.cases
    for case in suite.cases:
        assert case.kind in KINDS
        assert set(case.settings) == set(KINDS[case.kind].fields)  # defaults filled, nothing unknown


def test_the_old_scripts_measurements_have_suites() -> None:
    kinds = {c.kind for n in suite_names() for c in load_suite(n).cases}
    assert kinds == set(KINDS)  # every case kind is used by a committed suite


def test_unknown_kind_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown case kind 'decod'.*choose from .*'decode'"):
        parse_suite(_suite([{"name": "a", "kind": "decod", "cache": {"method": "full"}}]), "s")


def test_unknown_method_is_named() -> None:
    with pytest.raises(ValueError, match=r"case 'a': cache: unknown method 'snapk'; choose one of: .*snapkv"):
        parse_suite(_suite([{"name": "a", "kind": "decode", "cache": {"method": "snapk"}}]), "s")


@pytest.mark.parametrize("cache, message", [
    ({"method": "snapkv", "budgt": 0.2}, r"keys \['budgt'\] are unknown"),
    ({"method": "snapkv", "channel": "kiwi"}, r"unknown channel method 'kiwi'; choose one of"),
    ({"method": "snapkv", "crosslayer": "shared"}, r"unknown cross-layer method 'shared'"),
    ({"method": "snapkv", "allocation": "flat"}, r"unknown allocation 'flat'"),
    ({"method": "snapkv", "budget": 0}, r"budget 0 is out of range"),
    ("method=snapkv budget=0", r"budget 0 is out of range"),
    ("method=snapkv bits=2", r"key 'bits' is unknown"),
    ({"method": "snapkv", "channel_params": {"bits": 2}}, r"channel_params \{'bits': 2\} given without a channel"),
    ({"method": "full", "budget": 0.2}, r"takes no settings, got \['budget'\]"),
    ({"method": "snapkv", "evict_every": 0}, r"evict_every=0 is out of range"),
])
def test_bad_cache_settings_are_named(cache: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cache(cache)


def test_a_case_cache_is_a_cache_spec() -> None:
    from squeezekv.spec import CacheSpec

    spec = CacheSpec(method="h2o", budget=0.2, allocation="uniform", evict_every=16)
    assert parse_cache(spec.to_text()) == parse_cache(spec.to_dict()) == spec.to_dict()
    assert parse_cache({"method": "snapkv"}) == CacheSpec(method="snapkv").to_dict()  # the spec's defaults
    assert parse_cache("full") == parse_cache({"method": "full"}) == {"method": "full"}


@pytest.mark.parametrize("case, message", [
    ({"name": "a", "kind": "decode", "cache": {"method": "full"}, "batchs": [1]}, r"unknown key\(s\) \['batchs'\]"),
    ({"name": "a", "kind": "decode"}, r"missing \['cache'\]"),
    ({"name": "a", "kind": "decode", "cache": {"method": "full"}, "baseline": "b"}, r"baseline 'b' is not a case"),
    ({"name": "a", "kind": "decode", "cache": {"method": "full"}, "batches": [1.5]}, r"batches=\[1.5\] must be"),
    ({"name": "a", "kind": "decode", "cache": {"method": "full"}, "fill": "zeros"}, r"fill='zeros'"),
    ({"name": "a", "kind": "decode", "cache": {"method": "full"}, "kernel": {"kivi": {}}},
     r"kernel module 'kivi' unknown"),
    ({"name": "a", "kind": "quality", "cache": {"method": "full"}, "tasks": ["needles"]},
     r"unknown task\(s\) \['needles'\]"),
    ({"name": "a", "kind": "lckv", "phase": "train"}, r"unknown phase 'train'"),
])
def test_bad_case_settings_are_named(case: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_suite(_suite([case]), "s")


def test_suite_level_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown suite 'nope'; the suites are: \[.*'tiny_cpu'"):
        load_suite("nope")
    with pytest.raises(ValueError, match=r"no such model shape; choose from \[.*'micro'"):
        parse_suite({"model": {"random": "huge"}, "cases": [{"name": "a", "kind": "decode",
                                                             "cache": {"method": "full"}}]}, "s")
    case = {"name": "a", "kind": "decode", "cache": {"method": "full"}}
    with pytest.raises(ValueError, match=r"case name 'a' is used twice"):
        parse_suite(_suite([case, case]), "s")


def test_defaults_merge_only_into_kinds_that_take_them() -> None:
    suite = parse_suite(_suite([{"name": "a", "kind": "decode", "cache": {"method": "full"}},
                                {"name": "b", "kind": "serving_replay", "turns": 2}],
                               defaults={"context": 64, "steps": 1}), "s")
    assert suite.cases[0].settings["context"] == 64 and suite.cases[0].settings["steps"] == 1
    assert "context" not in suite.cases[1].settings and suite.cases[1].settings["turns"] == 2


def test_tiny_cpu_suite_end_to_end(tmp_path: Path) -> None:
    path = run_suite("tiny_cpu", tmp_path, quiet=True)
    assert path == tmp_path / "tiny_cpu.json"
    report = json.loads(path.read_text())
    import torch
    import transformers

    import squeezekv

    assert report["suite"] == "tiny_cpu"
    assert report["config"] == json.loads(json.dumps(load_suite("tiny_cpu").as_dict()))
    v = report["versions"]
    assert (v["torch"], v["transformers"], v["squeezekv"]) == (torch.__version__, transformers.__version__,
                                                               squeezekv.__version__)
    assert "commit" in v["squeezekv_git"]
    assert report["device"]["device"] == "cpu" and report["device"]["gpu"] is None
    cases = report["cases"]
    assert list(cases) == [c.name for c in load_suite("tiny_cpu").cases]
    # the full cache: 2 (K and V) x layers x kv heads x context x head_dim x 4 bytes (float32), batch 1
    full = cases["full"]["rows"][0]
    m = MICRO
    assert full["kv_bytes_start"] == 2 * m["num_hidden_layers"] * m["num_key_value_heads"] * 128 * m["head_dim"] * 4
    assert full["tokens_per_s"] > 0 and len(full["times"]) == 1
    snap = cases["snapkv"]["rows"][0]
    assert snap["kv_bytes_start"] == full["kv_bytes_start"] // 4  # 25% of 128 tokens kept per layer
    assert snap["kv_bytes_start_vs_baseline"] == 0.25
    assert snap["tokens_per_s_vs_baseline"] == snap["tokens_per_s"] / full["tokens_per_s"]
    prefill = cases["prefill-snapkv"]["rows"]
    assert [r["prefill_chunk"] for r in prefill] == [0, 64]
    assert all(r["kv_bytes"] == full["kv_bytes_start"] // 4 for r in prefill)
    assert cases["maxbatch-snapkv"]["rows"][0]["max_batch"] == 4  # the case's cap: every probe fits on CPU
    from benchmarks.plot import plot_suite

    figures = plot_suite(report, tmp_path)
    assert [f.name for f in figures] == ["tiny_cpu_decode.png", "tiny_cpu_max_batch.png", "tiny_cpu_prefill.png"]
    assert all(f.stat().st_size > 0 for f in figures)


def test_docs_paths_under_benchmarks_exist() -> None:
    """Every benchmarks/... path the README and docs name (in backticks or links) exists (globs: one match)."""
    missing = []
    for doc in [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        refs = re.findall(r"`(benchmarks/[^`\s]*)", text) + re.findall(r"\]\((?:\.\./)*(benchmarks/[^)\s#]*)", text)
        for ref in refs:
            ref = ref.rstrip(".,;:)")
            if not list(ROOT.glob(ref)):
                missing.append(f"{doc.relative_to(ROOT)}: {ref}")
    assert not missing, "\n".join(missing)
