"""squeezekv caches on a model sharded by transformers' tensor parallelism: 2 processes on CPU (gloo), a tiny Llama
and a tiny Qwen2 sharded 2 ways, every policy x allocation plus every channel and cross-layer method, each against the
unsharded model with the same cache settings. One spawn runs everything (tests/tp_worker.py); the tests below read
what each rank recorded."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import squeezekv
from conftest import build_model
from squeezekv.channel import coupled as cq
from squeezekv.channel.eigen_calibrate import calibrate as eigen_calibrate
from squeezekv.channel.eigen_calibrate import save as eigen_save

ARCHS = ["llama", "qwen2"]
WORLD = 2
TIMEOUT_S = 150
POLICY_CASES = [f"{p}-{a}" for p in squeezekv.policy_names() for a in squeezekv.allocation_names()]
METHOD_CASES = ["kivi-h2o-squeeze", "coupled-window", "eigen-snapkv", "minicache-h2o", "shared_attention-streamingllm"]
ATOL = 1e-5  # float32: the row-parallel all-reduce sums the heads' partial outputs in another order

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What every rank recorded (list indexed by rank)."""
    import tp_worker

    root = tmp_path_factory.mktemp("tp")
    checkpoints = {}
    for arch in ARCHS:
        build_model(arch, layers=4).save_pretrained(root / arch)
        checkpoints[arch] = str(root / arch)
    files = {}  # calibrations made on the unsharded model, one per architecture
    for arch in ARCHS:
        model = build_model(arch, layers=4)
        m = cq.CoupledQuant(bits=1, channels=4)
        calib_ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(99))
        m.set_codebooks(cq.calibrate(model, calib_ids, 1, 4, iters=10))
        m.save(root / f"cq-{arch}.pt")
        g = torch.Generator().manual_seed(99)
        seqs = [torch.randint(3, 128, (48,), generator=g).tolist() for _ in range(4)]
        eigen_save(eigen_calibrate(model, seqs), root / f"eigen-{arch}.pt")
        files[arch] = {"cq": str(root / f"cq-{arch}.pt"), "eigen": str(root / f"eigen-{arch}.pt")}
    out = root / "out"
    out.mkdir()
    ctx = mp.start_processes(tp_worker.worker, args=(WORLD, _free_port(), checkpoints, files, str(out)),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {WORLD} tensor-parallel ranks did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    recs = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, rec in enumerate(recs):
        assert "error" not in rec, f"rank {r} failed:\n{rec['error']}"
    return recs


def _both(ranks, arch, case):
    recs = [r[arch, case] for r in ranks]
    for rank, rec in enumerate(recs):
        assert not (isinstance(rec, dict) and "error" in rec), f"rank {rank}, {arch} {case}:\n{rec['error']}"
    return recs


@pytest.mark.parametrize("arch", ARCHS)
def test_each_rank_holds_its_half_of_the_kv_heads(ranks, arch):
    assert [r[arch, "tp"]["heads"] for r in ranks] == [(0, 1), (1, 2)]  # 2 KV heads, 1 per rank
    assert all(r[arch, "tp"]["size"] == WORLD and r[arch, "tp"]["unsharded"] is None for r in ranks)
    for rec in _both(ranks, arch, "h2o-uniform"):
        assert rec["local_kv_heads"] == [1, 1, 1, 1]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", POLICY_CASES + METHOD_CASES)
def test_sharded_generation_equals_the_unsharded_model(ranks, arch, case):
    """Greedy tokens equal and logits within float32 tolerance of the unsharded model with the same cache settings;
    same plan and the same number of tokens seen on every rank."""
    recs = _both(ranks, arch, case)
    for rank, rec in enumerate(recs):
        assert rec["sequences"] == rec["ref_sequences"], f"rank {rank}"
        assert rec["max_logit_diff"] <= ATOL, f"rank {rank}: {rec['max_logit_diff']}"
        assert rec["plan"] == rec["ref_plan"], f"rank {rank}"
        assert rec["seq_length"] == rec["ref_seq_length"] == 48 + 8 - 1
        assert rec["agreement_error"] is None
        assert rec["token_idx_equal"], f"rank {rank} kept other tokens than the unsharded model for its heads"
    assert recs[0]["sequences"] == recs[1]["sequences"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", POLICY_CASES)
def test_each_rank_keeps_the_unsharded_keys_of_its_heads_and_bytes_add_up(ranks, arch, case):
    recs = _both(ranks, arch, case)
    per_rank = [rec["nbytes"] for rec in recs]
    for rec in recs:
        assert rec["keys_max_diff"] <= ATOL
        assert rec["nbytes_per_rank"] == per_rank
        # every tensor of the cache is per KV head: the two halves hold exactly the unsharded cache's bytes
        assert rec["total_nbytes"] == sum(per_rank) == rec["ref_nbytes"]
        assert rec["total_kv_nbytes"] == rec["ref_kv_nbytes"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", [c for c in POLICY_CASES if c.endswith("-squeeze")] + ["kivi-h2o-squeeze"])
def test_squeeze_importances_are_identical_on_every_rank(ranks, arch, case):
    for rec in _both(ranks, arch, case):
        assert rec["importance_rank_diff"] == 0.0  # all-gathered in the test
        assert rec["plan_details"]["tp_importance_max_diff"] == 0.0  # compared at run time
        assert rec["importance_vs_unsharded"] <= 1e-6
        assert len(set(rec["plan"])) > 1  # the importances really moved budget between layers


@pytest.mark.parametrize("arch", ARCHS)
def test_kivi_on_the_sharded_model_round_trips(ranks, arch):
    """The rank's quantised keys/values, dequantised, equal the unsharded model's for the same heads and lie within
    half a quantisation step of the exact keys/values of the sharded model."""
    for rec in _both(ranks, arch, "kivi-round-trip"):
        assert rec["nq"] == [40, 40, 40, 40]  # (48 - 8 residual) quantised per layer
        assert rec["dequant_vs_unsharded"] <= 1e-5
        assert rec["key_err_over_bound"] <= 1e-5 and rec["val_err_over_bound"] <= 1e-5
        assert rec["max_val_err"] > 0  # something was really quantised


@pytest.mark.parametrize("arch", ARCHS)
def test_coupled_without_a_calibration_file_is_refused_under_tp(ranks, arch):
    for rec in _both(ranks, arch, "coupled-uncalibrated"):
        assert rec is not None and "coupled under tensor parallelism" in rec and "calibrate-cq" in rec


def test_agree_uses_rank_zero_values_and_reports_the_difference(ranks):
    for rec in _both(ranks, "llama", "agree"):
        assert rec == ([0.0, 5.0], 1.0)


def test_helpers_are_local_without_tensor_parallelism(make_model, make_ids):
    model = make_model("llama")
    assert squeezekv.distributed.tensor_parallel(model) is None
    cache = squeezekv.make_cache(model, "h2o", 0.5, "squeeze")
    model(make_ids(1, 32), cache=cache)
    assert cache.tp is None and "tp_importance_max_diff" not in cache.plan.details
    assert squeezekv.total_nbytes(cache) == cache.nbytes() and squeezekv.total_kv_nbytes(cache) == cache.kv_nbytes()
    assert squeezekv.distributed.nbytes_per_rank(cache) == [cache.nbytes()]
    squeezekv.distributed.check_agreement(cache)  # no-op
