"""One rank of the tensor-parallel test (tests/test_tensor_parallel.py), started by ``torch.multiprocessing.spawn``.

Each rank loads every tiny checkpoint twice: sharded 2 ways by transformers (``DistributedConfig(tp_size=2)``, gloo)
and unsharded, runs every case on both with the same cache settings, and saves what it saw (plain Python values) to
``out/rank{rank}.pt``; the test process asserts on them."""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
import torch.distributed as dist

import squeezekv
from conftest import greedy, left_padded  # noqa: E402  (tests/ is on the children's sys.path)
from squeezekv.distributed import check_agreement, nbytes_per_rank, tensor_parallel, total_kv_nbytes, total_nbytes

PROMPT = 48
NEW = 8
KIVI = {"bits": 2, "group_size": 8, "residual": 8}


def method_params(policy: str) -> dict[str, Any]:
    return {"window": 8} if policy == "snapkv" else {}


def alloc_params(allocation: str) -> dict[str, Any]:
    # PyramidKV's default beta=20 gives the top layer base/20 tokens, below SnapKV's window on a 48-token prompt
    return {"beta": 1.5} if allocation == "pyramid" else {}


def cases(files: dict[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for policy in squeezekv.policy_names():
        for allocation in squeezekv.allocation_names():
            out[f"{policy}-{allocation}"] = dict(
                method=policy, budget=0.5, allocation=allocation, method_params=method_params(policy),
                allocation_params=alloc_params(allocation))
    out["kivi-h2o-squeeze"] = dict(method="h2o", budget=0.5, allocation="squeeze", channel="kivi", channel_params=KIVI)
    out["coupled-window"] = dict(method="window", budget=0.5, channel="coupled",
                                 channel_params={"bits": 1, "channels": 4, "residual": 2, "calibration": files["cq"]})
    out["eigen-snapkv"] = dict(method="snapkv", budget=0.5, method_params={"window": 8}, channel="eigen",
                               channel_params={"calibration": files["eigen"], "rank": 6})
    out["minicache-h2o"] = dict(method="h2o", budget=0.5, crosslayer="minicache",
                                crosslayer_params={"start_layer": 0, "gamma": 0.3})
    out["shared_attention-streamingllm"] = dict(method="streamingllm", budget=0.5, crosslayer="shared_attention",
                                                crosslayer_params={"spans": [[1, 2]]})
    return out


def _layers(cache):
    return [cache.layers[i] for i in cache.managed]


def run_case(sharded, ref, kw: dict[str, Any], ids, mask, tp) -> dict[str, Any]:
    lo, hi = tp.head_start, tp.head_stop
    cache = squeezekv.make_cache(sharded, **kw)
    out = greedy(sharded, ids, mask, cache=cache, new_tokens=NEW)
    ref_cache = squeezekv.make_cache(ref, **kw)
    want = greedy(ref, ids, mask, cache=ref_cache, new_tokens=NEW)
    rec: dict[str, Any] = {
        "sequences": out.sequences.tolist(),
        "ref_sequences": want.sequences.tolist(),
        "max_logit_diff": max(float((a - b).abs().max()) for a, b in zip(out.logits, want.logits)),
        "plan": list(cache.plan.budgets), "ref_plan": list(ref_cache.plan.budgets),
        "plan_details": dict(cache.plan.details),
        "seq_length": cache.get_seq_length(), "ref_seq_length": ref_cache.get_seq_length(),
        "local_kv_heads": [layer.keys.shape[1] if layer.stores_keys else layer.values.shape[1]
                           for layer in _layers(cache)],
        "token_idx_equal": all(torch.equal(a.token_idx, b.token_idx[:, lo:hi])
                               for a, b in zip(_layers(cache), _layers(ref_cache))),
        "nbytes": cache.nbytes(), "ref_nbytes": ref_cache.nbytes(), "ref_kv_nbytes": ref_cache.kv_nbytes(),
        "nbytes_per_rank": nbytes_per_rank(cache), "total_nbytes": total_nbytes(cache),
        "total_kv_nbytes": total_kv_nbytes(cache),
    }
    if "channel" not in kw and "crosslayer" not in kw:
        rec["keys_max_diff"] = max(float((a.keys - b.keys[:, lo:hi]).abs().max())
                                   for a, b in zip(_layers(cache), _layers(ref_cache)))
    try:
        check_agreement(cache)
        rec["agreement_error"] = None
    except RuntimeError as err:
        rec["agreement_error"] = str(err)
    if cache.importance:
        _, rec["importance_rank_diff"] = tp.agree("importance", [cache.importance[i] for i in cache.managed])
        rec["importance_vs_unsharded"] = max(abs(cache.importance[i] - ref_cache.importance[i]) for i in cache.managed)
    return rec


def kivi_round_trip(sharded, ref, ids, tp) -> dict[str, Any]:
    """No eviction, residual 8: the rank's quantised storage, dequantised, against the unsharded model's for the same
    heads and against the exact keys/values of the sharded model's full cache (within half a quantisation step)."""
    from transformers import DynamicCache

    lo, hi = tp.head_start, tp.head_stop
    kw = dict(method="none", budget=4096, channel="kivi", channel_params=KIVI)
    cache, ref_cache = squeezekv.make_cache(sharded, **kw), squeezekv.make_cache(ref, **kw)
    exact = DynamicCache(config=sharded.config)
    sharded(ids, cache=cache)
    ref(ids, cache=ref_cache)
    squeezekv.detach(sharded)
    sharded(ids, cache=exact)
    qmax = (1 << KIVI["bits"]) - 1
    rec = {"nq": [], "dequant_vs_unsharded": 0.0, "codes_equal": True, "key_err_over_bound": 0.0,
           "val_err_over_bound": 0.0, "max_val_err": 0.0}
    for i in cache.managed:
        a, b = cache.layers[i], ref_cache.layers[i]
        nq = a.nq
        rec["nq"].append(nq)
        ka, va = a._dequant(slice(0, nq))
        kb, vb = b._dequant(slice(0, nq))
        rec["dequant_vs_unsharded"] = max(rec["dequant_vs_unsharded"], float((ka - kb[:, lo:hi]).abs().max()),
                                          float((va - vb[:, lo:hi]).abs().max()))
        rec["codes_equal"] &= torch.equal(a.kcode, b.kcode[:, lo:hi]) and torch.equal(a.vcode, b.vcode[:, lo:hi])
        k, v = exact.layers[i].keys[:, :, :nq], exact.layers[i].values[:, :, :nq]  # [B, H_local, nq, D]
        bsz, h, _, d = k.shape
        g = KIVI["group_size"]
        kg = k.reshape(bsz, h, nq // g, g, d)
        kstep = (kg.amax(3, keepdim=True) - kg.amin(3, keepdim=True)) / qmax
        kerr = (ka.reshape(bsz, h, nq // g, g, d) - kg).abs() - kstep / 2
        vg = v.reshape(bsz, h, nq, d // g, g)
        vstep = (vg.amax(4, keepdim=True) - vg.amin(4, keepdim=True)) / qmax
        verr = (va.reshape(bsz, h, nq, d // g, g) - vg).abs()
        rec["key_err_over_bound"] = max(rec["key_err_over_bound"], float(kerr.max()))
        rec["val_err_over_bound"] = max(rec["val_err_over_bound"], float((verr - vstep / 2).max()))
        rec["max_val_err"] = max(rec["max_val_err"], float(verr.max()))
    return rec


def worker(rank: int, world: int, port: int, checkpoints: dict[str, str], files: dict[str, str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    records: dict[str, Any] = {}
    try:
        with torch.no_grad():
            ids, mask = left_padded([PROMPT, PROMPT - 11], PROMPT)
            for arch, path in checkpoints.items():
                sharded = AutoModelForCausalLM.from_pretrained(
                    path, distributed_config=DistributedConfig(tp_size=world), dtype=torch.float32).eval()
                ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                tp = tensor_parallel(sharded)
                records[arch, "tp"] = {"rank": tp.rank, "size": tp.size, "heads": (tp.head_start, tp.head_stop),
                                       "unsharded": tensor_parallel(ref)}
                for name, kw in cases(files[arch]).items():
                    try:  # a failing case fails its own tests (both ranks fail alike: same code, same shapes)
                        records[arch, name] = run_case(sharded, ref, kw, ids, mask, tp)
                    except Exception:  # noqa: BLE001
                        records[arch, name] = {"error": traceback.format_exc()}
                records[arch, "kivi-round-trip"] = kivi_round_trip(sharded, ref, ids[:1], tp)
                try:
                    squeezekv.make_cache(sharded, "window", 0.5, channel="coupled",
                                         channel_params={"bits": 1, "channels": 4})
                    records[arch, "coupled-uncalibrated"] = None
                except ValueError as err:
                    records[arch, "coupled-uncalibrated"] = str(err)
                records[arch, "agree"] = tp.agree("test values", [float(rank), 5.0])
    except Exception:  # noqa: BLE001 - reported to the test process, which fails with it
        records["error"] = traceback.format_exc()
    finally:
        torch.save(records, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
