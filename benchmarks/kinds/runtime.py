"""The decode runtime (:mod:`squeezekv.runtime`): batched decode steps over a slot pool, one CUDA graph per batch
bucket, timed like the other decode kinds (the cache of each request filled with random keys/values as right after
its prompt's compression, then admitted into a slot); and the largest batch its pool holds, decoded at that batch."""

from __future__ import annotations

from typing import Any

import torch

from squeezekv.bench import free, full_cache, or_oom, timed, weight_bytes

from ..caches import cache_spec, filled_cache, is_full, kv_bytes
from ..suite import Case
from . import REQUIRED, kind
from .decode import TIMING, _cuda, batches_of, hbm_bandwidth

#: tokens a slot is sized to decode (SnapKV's pool capacity is its budget plus these; the max batch uses the same)
NEW_TOKENS = 128


def _runtime(ctx: Any, cache: dict[str, Any], batch: int, context: int, chunk: int, new_tokens: int,
             graph: bool, compile: bool = False, slots: int | None = None) -> tuple[Any, list[int], int, Any]:
    """A runtime whose pool has ``slots`` slots (default ``batch``), ``batch`` of them holding a request as right
    after its prompt: ``(runtime, their slots, one request's live KV bytes, that request's cache)``."""
    from squeezekv.runtime.pool import KVPool
    from squeezekv.runtime.pools import pool_for_cache
    from squeezekv.runtime.runtime import DecodeRuntime

    if is_full(cache):  # the full cache in a pool that never evicts (policy none): slots of context + new tokens
        first = full_cache(ctx.model, 1, context, ctx.device)
        keys = first.layers[0].keys  # [1, H, context, D]
        pool = KVPool([context + new_tokens] * len(first.layers), slots or batch, keys.shape[1], keys.shape[-1],
                      dtype=keys.dtype, device=keys.device)
        policy: Any = "none"
    else:
        spec = cache_spec(ctx.model, cache).replace(evict_every=chunk)
        first = filled_cache(ctx.model, spec.to_dict(), 1, context, ctx.device)  # one request, after its prompt
        pool = pool_for_cache(first, max_seqs=slots or batch, max_new_tokens=new_tokens)
        policy = first.policy
    live = kv_bytes(first)
    rt = DecodeRuntime(ctx.model, pool, policy, chunk, use_graph=graph and _cuda(ctx.device), compile=compile)
    return rt, [rt.join(first) for _ in range(batch)], live, first


@torch.no_grad()
def runtime_once(ctx: Any, cache: dict[str, Any], batch: int, context: int, steps: int, warmup: int, reps: int,
                 chunk: int, graph: bool, new_tokens: int = NEW_TOKENS, compile: bool = False,
                 shared: dict[str, Any] | None = None, slots_for: int | None = None) -> dict[str, Any]:
    """One batch's decode timing. ``shared`` (a dict kept across a case's batches): the first call builds a runtime
    whose pool holds ``slots_for`` slots and keeps it there; later calls join their batch into the same runtime (a
    compiled runtime compiles its step once for every batch of 2 rows and more, instead of once per batch)."""
    model, device = ctx.model, ctx.device
    if _cuda(device):
        torch.cuda.reset_peak_memory_stats()
    if warmup + steps * reps + 2 > new_tokens:
        raise ValueError(f"{warmup} + {reps} x {steps} decode steps do not fit in new_tokens={new_tokens}")
    if shared and "rt" in shared:
        rt, live_one = shared["rt"], shared["live"]
        slots = [rt.join(shared["first"]) for _ in range(batch)]
    else:
        if compile:
            # a new runtime is a new compilation of its step: without a reset, dynamo's recompilation limit (8)
            # would silently run the later cases of a suite uncompiled
            torch._dynamo.reset()
        rt, slots, live_one, first = _runtime(ctx, cache, batch, context, chunk, new_tokens, graph, compile,
                                              slots_for)
        if shared is not None:
            shared.update(rt=rt, live=live_one, first=first)
    ids = torch.randint(0, model.config.vocab_size, (batch,), device=device)  # [B]
    state = {"ids": ids}

    def run_steps(n: int) -> None:
        for _ in range(n):
            state["ids"] = rt.step(slots, state["ids"]).argmax(-1)  # [B]

    warmup_s = timed(lambda: run_steps(warmup), 1, device)[0]  # the bucket's compilation and capture included
    times = timed(lambda: run_steps(steps), reps, device)
    per_step = sorted(times)[len(times) // 2] / steps
    live = live_one * batch
    res = {"batch": batch, "context": context, "chunk": chunk, "graph": rt.use_graph, "compile": rt.compile,
           "warmup_s": warmup_s, "ms_per_step": 1e3 * per_step,
           "tokens_per_s": batch / per_step, "times": times, "kv_bytes_start": live,
           "pool_bytes": rt.pool.nbytes(), "slot_bytes": rt.pool.slot_nbytes()}
    if _cuda(device):
        bw = hbm_bandwidth()
        if bw:
            res["roofline_fraction"] = (weight_bytes(model) + live) / bw / per_step
        res["peak_allocated"] = torch.cuda.max_memory_allocated()
    if shared is not None:
        for s in slots:
            rt.leave(s)
    rt = None
    free(device)
    return res


def _check(settings: dict[str, Any], where: str) -> None:
    if not isinstance(settings.get("compile", False), bool):
        raise TypeError(f"{where}: compile={settings['compile']!r} must be true or false")
    if not isinstance(settings["chunk"], int) or settings["chunk"] < 1:
        raise ValueError(f"{where}: chunk={settings['chunk']!r} is out of range: an integer >= 1")
    compare = settings.get("compare", [])
    if not isinstance(compare, list) or not all(isinstance(c, str) for c in compare):
        raise TypeError(f"{where}: compare={compare!r} must be a list of case names")


@kind("runtime_decode", {"cache": REQUIRED, "batches": [1, 16, 64], "context": 4096, **TIMING, "chunk": 16,
                         "graph": True, "compile": False, "baseline": None, "at_max_batch_of": None, "compare": []},
      check=_check)
def runtime_decode(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """Decode tokens/s through the runtime at each batch (``at_max_batch_of``: also at the max batch a
    ``runtime_max_batch`` case found); out-of-memory recorded as ``oom``. ``compare``: other cases of the suite
    (e.g. a ``kvpress_decode`` one) whose rows of the same batch give ``tokens_per_s_vs_<case>``."""
    rows = []
    batches = batches_of(ctx, case)
    # compiled: one runtime for the case's batches, its pool sized for the largest (one compilation, not one per
    # batch; batch 1 is its own compilation anyway)
    shared: dict[str, Any] | None = {} if case.get("compile") else None
    for b in batches:
        r = or_oom(lambda: runtime_once(ctx, case.get("cache"), b, case.get("context"), case.get("steps"),
                                        case.get("warmup"), case.get("reps"), case.get("chunk"), case.get("graph"),
                                        compile=case.get("compile"), shared=shared, slots_for=max(batches)),
                   ctx.device, batch=b)
        rows.append(r)
        ctx.progress(case, r)
    shared = None
    free(ctx.device)
    return rows


@kind("runtime_max_batch", {"cache": REQUIRED, "context": 4096, "chunk": 16, "new_tokens": NEW_TOKENS, "probe_steps": 2,
                            "reserve_gib": 4.0, "graph": True, "compile": False, "baseline": None}, check=_check)
def runtime_max_batch(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """The largest batch whose pool (slots of ``budget + chunk`` entries, SnapKV ``budget + new_tokens``) and decode
    step fit: from free memory (less ``reserve_gib`` for activations and graphs) over one slot's bytes, shrunk by
    1/16 until ``probe_steps`` steps run without running out of memory."""
    from squeezekv.runtime.pools import pool_for_cache

    ctx_len, chunk = case.get("context"), case.get("chunk")
    spec = cache_spec(ctx.model, case.get("cache")).replace(evict_every=chunk)
    probe = filled_cache(ctx.model, spec.to_dict(), 1, ctx_len, ctx.device)
    slot = pool_for_cache(probe, max_seqs=1, max_new_tokens=case.get("new_tokens")).slot_nbytes()
    probe = None
    free(ctx.device)
    avail = torch.cuda.mem_get_info()[0] - int(case.get("reserve_gib") * 2**30) if _cuda(ctx.device) else 64 * slot
    b = max(1, avail // slot - 1)
    tries = []
    while b >= 1:
        r = or_oom(lambda: runtime_once(ctx, case.get("cache"), b, ctx_len, case.get("probe_steps"), 1, 1, chunk,
                                        case.get("graph"), case.get("new_tokens"), case.get("compile")), ctx.device,
                   batch=b)
        tries.append({"batch": b, "oom": bool(r.get("oom"))})
        if not r.get("oom"):
            row = {"max_batch": b, "slot_bytes": slot, "tries": tries}
            ctx.progress(case, row)
            return [row]
        b = b - max(1, b // 16)
    return [{"max_batch": 0, "slot_bytes": slot, "tries": tries}]


@kind("runtime_profile", {"cache": REQUIRED, "batch": 64, "context": 4096, "chunk": 16, "steps": 8, "top": 15,
                          "graph": True, "compile": False, "baseline": None}, check=_check)
def runtime_profile(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """Where a runtime decode step's GPU time goes: ``steps`` replayed steps at ``batch`` under ``torch.profiler``;
    the ``top`` kernels by total device time (microseconds per step) and the device time per step."""
    from torch.profiler import ProfilerActivity, profile

    b, steps = case.get("batch"), case.get("steps")
    rt, slots, _, _ = _runtime(ctx, case.get("cache"), b, case.get("context"), case.get("chunk"), NEW_TOKENS,
                            case.get("graph"), case.get("compile"))
    ids = torch.randint(0, ctx.model.config.vocab_size, (b,), device=ctx.device)  # [B]
    for _ in range(3):
        ids = rt.step(slots, ids).argmax(-1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _cuda(ctx.device) else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            ids = rt.step(slots, ids).argmax(-1)
        if _cuda(ctx.device):
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events)
    rows = [{"kernel": e.key[:120], "us_per_step": e.device_time_total / steps, "calls_per_step": e.count / steps}
            for e in events[:case.get("top")]]
    row = {"batch": b, "device_us_per_step": total / steps, "top": rows}
    ctx.progress(case, {"batch": b, "device_us_per_step": row["device_us_per_step"]})
    rt = None
    free(ctx.device)
    return [row]
