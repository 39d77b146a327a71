"""benchmarks/ruler_summary.py: the RULER tables in docs/results.md are what the committed records give."""

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("ruler_summary", ROOT / "benchmarks" / "ruler_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sign_test_is_the_exact_binomial():
    mod = _module()
    assert mod.sign_test(0, 0) == 1.0
    assert mod.sign_test(0, 10) == pytest.approx(2 / 2 ** 10)
    assert mod.sign_test(3, 11) == pytest.approx(2 * sum(math.comb(14, i) for i in range(4)) / 2 ** 14)
    assert mod.sign_test(5, 5) == 1.0


def test_paired_difference_uses_only_shared_examples():
    mod = _module()

    def rec(s):
        return {"scores": {"ruler": s}}

    a = {"x": rec(1.0), "y": rec(0.0), "z": rec(1.0)}
    b = {"x": rec(0.0), "y": rec(0.0), "w": rec(1.0)}
    res = mod.paired(a, b)
    assert res["n"] == 2 and res["delta"] == pytest.approx(50.0)
    assert (res["better"], res["worse"], res["tied"]) == (1, 0, 1)


def test_docs_and_summary_match_the_records():
    mod = _module()
    if not mod.SUMMARY.exists() or not all((mod.RESULTS / f / "results.jsonl").exists() for f in mod.FOLDERS):
        pytest.skip("no RULER records in this checkout")
    assert mod.main(["--check"]) == 0
