"""Inference measurements of an LCKV or standard model (Wu & Tu, ACL 2024, arXiv 2405.10637 report KV memory,
maximum batch and generation throughput): KV bytes per token read from the allocated cache, prefill time, decode
tokens/s at a batch, and the largest batch whose cache of ``context`` tokens plus ``gen`` decoded tokens fits.

For the memory and speed figures the cache is filled with random keys/values of the right shapes (values do not
change speed or memory); the prompt's real encoding (m + b iterations) is timed separately by :func:`prefill_time`.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

import torch

from .cache import LCKVCache, cache_nbytes, expected_nbytes
from .modeling import LCKVForCausalLM


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: LCKVForCausalLM) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def filled_cache(model: LCKVForCausalLM, batch: int, context: int, seed: int = 0) -> LCKVCache:
    """A cache holding ``context`` random tokens per row in every KV-producing layer (nothing elsewhere)."""
    device, dtype = _device(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = LCKVCache(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    for layer in cfg.kv_layers:
        # [B, Hkv, context, D]
        k = torch.randn((batch, cfg.num_key_value_heads, context, head_dim), generator=g, device=device, dtype=dtype)
        cache.update(k, torch.randn_like(k), layer)
    return cache


@torch.no_grad()
def kv_bytes_per_token(model: LCKVForCausalLM, tokens: int = 64) -> dict[str, Any]:
    """Bytes per token of a real cache after encoding ``tokens`` tokens (batch 1), and the formula's figure."""
    device, dtype = _device(model)
    x = torch.randint(3, model.config.vocab_size, (1, tokens), device=device)
    cache = model.make_cache()
    model(x, cache=cache, use_cache=True)
    measured = cache_nbytes(cache)
    return {"measured": measured / tokens, "formula": expected_nbytes(model.config, 1, 1, dtype),
            "kv_layers": len(model.config.kv_layers), "layers": model.config.num_hidden_layers}


@torch.no_grad()
def prefill_time(model: LCKVForCausalLM, batch: int, context: int, reps: int = 2) -> float:
    """Seconds to encode a prompt of ``context`` tokens at ``batch`` (the paper's iterative encoding), best of reps."""
    device, _ = _device(model)
    x = torch.randint(3, model.config.vocab_size, (batch, context), device=device)
    best = float("inf")
    for _ in range(reps):
        cache = model.make_cache()
        _sync(device)
        t = time.perf_counter()
        model(x, cache=cache, use_cache=True, logits_to_keep=1)
        _sync(device)
        best = min(best, time.perf_counter() - t)
        del cache
    return best


@torch.no_grad()
def decode_throughput(model: LCKVForCausalLM, batch: int, context: int, gen: int, warmup: int = 2) -> dict[str, Any]:
    """Greedy decoding of ``gen`` tokens at ``batch`` after a (random) cache of ``context`` tokens:
    tokens/s = batch * timed steps / seconds; plus peak CUDA memory when on a GPU."""
    device, _ = _device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = filled_cache(model, batch, context)
    tok = torch.randint(3, model.config.vocab_size, (batch, 1), device=device)
    timed = 0
    t = 0.0
    for step in range(warmup + gen):
        if step == warmup:
            _sync(device)
            t = time.perf_counter()
        tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        timed += step >= warmup
    _sync(device)
    seconds = time.perf_counter() - t
    out = {"batch": batch, "context": context, "gen": gen, "seconds": seconds,
           "tokens_per_s": batch * timed / seconds, "cache_bytes": cache_nbytes(cache)}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _fits(model: LCKVForCausalLM, batch: int, context: int, gen: int) -> bool:
    try:
        decode_throughput(model, batch, context, gen, warmup=0)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def max_batch(model: LCKVForCausalLM, context: int, gen: int, cap: int,
              fits: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """Largest batch (<= ``cap``) whose cache of ``context`` tokens decodes ``gen`` more without running out of
    memory: doubling, then bisection. ``fits`` replaces the real trial (tests)."""
    if not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap must be a positive int, got {cap!r}")
    trial = fits or (lambda b: _fits(model, b, context, gen))
    if not trial(1):
        return {"max_batch": 0, "capped": False, "context": context, "gen": gen}
    lo, hi = 1, None
    while hi is None:
        nxt = min(lo * 2, cap)
        if nxt == lo:
            return {"max_batch": lo, "capped": True, "context": context, "gen": gen}
        if trial(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if trial(mid) else (lo, mid)
    return {"max_batch": lo, "capped": False, "context": context, "gen": gen}
