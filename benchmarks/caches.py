"""Caches of a case's (parsed) cache settings: built fresh for a real prefill, or filled with random keys/values as
they stand right after a prompt's compression (weights are random in the throughput suites: values do not matter
for speed or memory)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

import squeezekv
from squeezekv.bench import full_cache
from squeezekv.plan import BudgetPlan

from .suite import BASELINE_METHODS, budget_tokens

FILL_CHUNK = 512  # tokens written (and quantised) at a time per layer when filling a quantising channel's layer
#: channels whose layers quantise what they hold through their own ``flush``
QUANTISING = ("kivi", "coupled")
_RANDOM_FILES: dict[tuple[Any, ...], str] = {}


def is_full(cache: dict[str, Any]) -> bool:
    return cache["method"] in BASELINE_METHODS


def random_calibration(model: Any, channel: str, params: dict[str, Any]) -> str:
    """A calibration file of random codebooks (coupled) or random orthonormal bases (eigen) of ``model``'s shape."""
    cfg = model.config
    h, d, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    if channel == "coupled":
        from squeezekv.channel.coupled import CoupledQuant

        cq = CoupledQuant(bits=params.get("bits", 2))
        key: tuple[Any, ...] = ("coupled", cq.bits, cq.coupled, h, d, layers)
        if key not in _RANDOM_FILES:
            k, c = 1 << (cq.bits * cq.coupled), cq.coupled
            gen = torch.Generator().manual_seed(0)
            cq.set_codebooks({i: tuple(torch.randn(2, h, d // c, k, c, generator=gen)) for i in range(layers)})
            _RANDOM_FILES[key] = str(Path(tempfile.mkdtemp(prefix="cq_books_")) / f"cq{cq.bits}.pt")
            cq.save(_RANDOM_FILES[key])
        return _RANDOM_FILES[key]
    if channel == "eigen":
        from squeezekv.channel.eigen import FORMAT

        key = ("eigen", h, d, layers)
        if key not in _RANDOM_FILES:
            g = torch.Generator().manual_seed(0)
            state: dict[str, Any] = {"format": FORMAT, "calibration": {"tokens": 0, "source": "random bases"},
                                     "model": {"model_type": "llama", "num_layers": layers, "num_kv_heads": h,
                                               "head_dim": d}}
            lam = torch.linspace(1.0, 0.01, d, dtype=torch.float64).expand(layers, h, d).contiguous()
            for name in ("key_pre", "key_post", "value"):
                q, _ = torch.linalg.qr(torch.randn(layers, h, d, d, generator=g, dtype=torch.float64))
                state[name] = {"basis": q.float().contiguous(), "eigenvalues": lam}
            path = Path(tempfile.mkdtemp(prefix="eigen_bases_")) / "random_bases.pt"
            torch.save(state, path)
            _RANDOM_FILES[key] = str(path)
        return _RANDOM_FILES[key]
    raise ValueError(f"calibration='random' is for the coupled and eigen channels, not {channel!r}")


def cache_spec(model: Any, cache: dict[str, Any]) -> squeezekv.CacheSpec:
    """The :class:`squeezekv.CacheSpec` of parsed cache settings (a random calibration resolved to a file)."""
    spec = squeezekv.CacheSpec.from_dict(cache)
    if spec.channel_params.get("calibration") == "random":
        params = dict(spec.channel_params)
        params["calibration"] = random_calibration(model, spec.channel, params)
        spec = spec.replace(channel_params=params)
    return spec


def new_cache(model: Any, cache: dict[str, Any]) -> Any:
    """An empty cache for a real prefill: transformers' ``DynamicCache`` (squeezekv detached) or squeezekv's."""
    if is_full(cache):
        squeezekv.detach(model)
        return DynamicCache(config=model.config)
    return squeezekv.make_cache(model, cache_spec(model, cache))


def filled_cache(model: Any, cache: dict[str, Any], batch: int, context: int, device: str) -> Any:
    """A cache as it stands right after a ``context``-token prompt: the full one holding ``context`` random tokens
    per layer, a compressed one its budget (uniform over layers; nothing evicted later when it keeps the prompt)."""
    if is_full(cache):
        return full_cache(model, batch, context, device)
    cfg = model.config
    kv_heads, head_dim, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    dtype = next(model.parameters()).dtype
    n = budget_tokens(cache, context)
    evicted = n < context
    budget = n if evicted else context + 4096  # keeps the prompt: no eviction while decoding either
    plan = BudgetPlan(budgets=(budget,) * layers, base=budget, allocation="uniform")
    spec = cache_spec(model, cache).replace(budget=budget, allocation="uniform")
    if spec.method == "snapkv":
        spec = spec.replace(method_params={"window": min(64, n), **spec.method_params})
    built = squeezekv.make_cache(model, spec, plan=plan)
    quantising = cache.get("channel") in QUANTISING
    from squeezekv.crosslayer.shared_attention import SharedLayer

    for layer in built.layers:
        empty = torch.empty(batch, kv_heads, 0, head_dim, device=device, dtype=dtype)  # [B, H, 0, D]
        layer.lazy_initialization(empty, empty)
        dk, dv = layer.keys.shape[-1], layer.values.shape[-1]  # eigen: the kept ranks
        idx = torch.arange(context - n, context, device=device, dtype=torch.int32)
        layer.token_idx = idx.expand(batch, kv_heads, n).contiguous()  # [B, H, n]
        if layer.scores is not None:
            layer.scores = torch.rand(batch, kv_heads, n, device=device)  # [B, H, n]
        if hasattr(layer, "pos_offset"):
            layer.pos_offset = torch.zeros(batch, dtype=torch.long, device=device)  # [B]
        layer.seen, layer.prefill_done, layer.compressed = context, True, evicted
        if quantising:
            for s in range(0, n, FILL_CHUNK):
                m = min(FILL_CHUNK, n - s)
                k = torch.randn(batch, kv_heads, m, head_dim, device=device, dtype=dtype)  # [B, H, m, D]
                layer.keys = torch.cat([layer.keys, k], dim=2)
                layer.values = torch.cat([layer.values, torch.randn_like(k)], dim=2)
                layer.flush()  # quantises all but the newest residual tokens
            continue
        if not isinstance(layer, SharedLayer):  # a shared layer holds values only: keys stay [B, H, 0, D]
            layer.keys = torch.randn(batch, kv_heads, n, dk, device=device, dtype=dtype)  # [B, H, n, Dk]
        layer.values = torch.randn(batch, kv_heads, n, dv, device=device, dtype=dtype)  # [B, H, n, Dv]
    return built


def kv_bytes(cache: Any) -> int:
    """Bytes of the keys/values a cache holds (squeezekv: without bookkeeping)."""
    if isinstance(cache, squeezekv.SqueezeCache):
        return cache.kv_nbytes()
    return squeezekv.dynamic_cache_nbytes(cache)


def all_bytes(cache: Any) -> int:
    """Bytes a cache holds, bookkeeping included."""
    if isinstance(cache, squeezekv.SqueezeCache):
        return cache.nbytes()
    return squeezekv.dynamic_cache_nbytes(cache)
