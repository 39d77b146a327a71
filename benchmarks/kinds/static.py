"""transformers' own fast path as a baseline: the full cache in a ``StaticCache`` (preallocated to the context plus
the decoded tokens), each decode step captured once as a CUDA graph and replayed -- what ``generate`` with
``cache_implementation="static"`` and a compiled/graphed step does, without ``torch.compile``'s warm-up. The cache
is filled with random keys/values of ``context`` positions (weights are random: values do not matter for speed)."""

from __future__ import annotations

from typing import Any

import torch

from squeezekv.bench import free, or_oom, timed, weight_bytes

from ..suite import Case
from . import kind
from .decode import TIMING, _cuda, hbm_bandwidth


@torch.no_grad()
def static_once(ctx: Any, batch: int, context: int, steps: int, warmup: int, reps: int,
                graph: bool = True) -> dict[str, Any]:
    from transformers import StaticCache

    import squeezekv

    model, device = ctx.model, ctx.device
    squeezekv.detach(model)  # transformers' own attention (an earlier case may have attached squeezekv's)
    cfg = model.config
    total = context + 4 + warmup + steps * (reps + 1)
    cache = StaticCache(config=cfg, max_cache_len=total)
    dtype = next(model.parameters()).dtype
    h, d = cfg.num_key_value_heads, cfg.head_dim
    for layer in cache.layers:
        k = torch.empty(batch, h, 1, d, device=device, dtype=dtype)  # [B, H, 1, D]: shapes only
        layer.lazy_initialization(k, k)
        layer.keys[:, :, :context].normal_()
        layer.values[:, :, :context].normal_()
        layer.cumulative_length.fill_(context)
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)  # [B, 1]
    pos = torch.full((1,), context, dtype=torch.long, device=device)  # [1]: the next position

    def forward() -> torch.Tensor:
        out = model(input_ids=ids, cache=cache, use_cache=True, cache_position=pos,
                    position_ids=pos.view(1, 1).expand(batch, 1), logits_to_keep=1)
        return out.logits[:, -1]  # [B, vocab]

    def rewind() -> None:  # each timed run decodes from the same position (the graph's buffers stay)
        pos.fill_(context)
        for layer in cache.layers:
            layer.cumulative_length.fill_(context)

    step = forward
    captured = None
    if graph and _cuda(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        rewind()
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            logits_t = forward()
        rewind()
        step = lambda: (captured.replay(), logits_t)[1]  # noqa: E731

    def run_steps(n: int) -> None:
        for _ in range(n):
            logits = step()
            ids.copy_(logits.argmax(-1, keepdim=True))
            pos.add_(1)

    run_steps(warmup)

    def one() -> None:
        rewind()
        run_steps(steps)

    times = timed(one, reps, device)
    per_step = sorted(times)[len(times) // 2] / steps
    live = 2 * cfg.num_hidden_layers * batch * h * d * context * dtype.itemsize  # live K+V bytes at the context
    res = {"batch": batch, "context": context, "graph": captured is not None, "ms_per_step": 1e3 * per_step,
           "tokens_per_s": batch / per_step, "times": times, "kv_bytes_start": live,
           "allocated_kv_bytes": 2 * cfg.num_hidden_layers * batch * h * d * total * dtype.itemsize}
    if _cuda(device):
        bw = hbm_bandwidth()
        if bw:
            res["roofline_fraction"] = (weight_bytes(model) + live) / bw / per_step
        res["peak_allocated"] = torch.cuda.max_memory_allocated()
    cache = captured = None
    free(device)
    return res


@kind("static_decode", {"batches": [1, 16, 64], "context": 4096, **TIMING, "graph": True, "baseline": None})
def static_decode(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """Full-cache decode tokens/s with transformers' ``StaticCache``, one CUDA graph per step (``graph``), at each
    batch (out-of-memory recorded as ``oom``)."""
    rows = []
    for b in sorted(case.get("batches")):
        r = or_oom(lambda: static_once(ctx, b, case.get("context"), case.get("steps"), case.get("warmup"),
                                       case.get("reps"), case.get("graph")), ctx.device, batch=b)
        rows.append(r)
        ctx.progress(case, r)
    return rows
