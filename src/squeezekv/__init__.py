"""squeezekv: KV-cache compression along the sequence and across layers for Hugging Face transformers models.

One line::

    out = model.generate(**inputs, cache=squeezekv.make_cache(model, method="snapkv", budget=0.2, allocation="squeeze"))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registry import allocation_names, describe, policy_names

if TYPE_CHECKING:
    from .attention import attach, detach
    from .cache import SqueezeCache, SqueezeLayer, allocated_nbytes, dynamic_cache_nbytes
    from .inputs import left_pad
    from .plan import Budget, BudgetPlan
    from .prefill import chunked_prefill
    from .distributed import total_kv_nbytes, total_nbytes
    from .registry import ALLOCATIONS, POLICIES

__version__ = "0.1.0"

# Imported on first use (PEP 562), so that ``import squeezekv`` (and the command line's help) imports neither torch
# nor transformers: name -> the submodule defining it.
_LAZY = {
    "attach": "attention", "detach": "attention", "SqueezeCache": "cache", "SqueezeLayer": "cache",
    "dynamic_cache_nbytes": "cache", "allocated_nbytes": "cache", "left_pad": "inputs", "Budget": "plan",
    "BudgetPlan": "plan", "total_nbytes": "distributed", "total_kv_nbytes": "distributed",
    "chunked_prefill": "prefill",
}


def __getattr__(name: str) -> Any:
    if name in ("POLICIES", "ALLOCATIONS"):  # the class tables fill as the method modules are imported
        from . import registry

        registry._load()
        return getattr(registry, name)
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_cache(
    model: Any,
    method: str = "snapkv",
    budget: float | int | str | Budget = 0.2,
    allocation: str = "uniform",
    *,
    method_params: dict[str, Any] | None = None,
    allocation_params: dict[str, Any] | None = None,
    plan: BudgetPlan | None = None,
    evict_every: int = 1,
    attn_backend: str | None = None,
    channel: str | None = None,
    channel_params: dict[str, Any] | None = None,
    crosslayer: str | None = None,
    crosslayer_params: dict[str, Any] | None = None,
) -> SqueezeCache:
    """A fresh compressed cache for one ``generate``/forward pass of ``model`` (attaches squeezekv to the model).

    ``method``: eviction policy (:func:`policy_names`); ``budget``: fraction of the prompt in (0, 1] (1.0: evict
    nothing) or tokens >= 1 per layer on average (capped at the model's context); ``allocation``: how the total is split across layers (:func:`allocation_names`);
    ``method_params``/``allocation_params``: the method's parameters; ``plan``: a fixed :class:`BudgetPlan` instead of
    one derived from the prompt; ``evict_every``: decoding steps between evictions for policies that keep evicting;
    ``attn_backend``: ``"sdpa"`` or ``"eager"`` math (default: what the model used before); ``channel``/
    ``crosslayer`` (+ ``_params``): a channel method (fewer bits or channels per token) and a training-free
    cross-layer method, composed with the eviction policy (:func:`squeezekv.describe` lists them).

    On a model sharded by transformers' tensor parallelism, call it on every rank: the cache holds the rank's KV
    heads (:mod:`squeezekv.distributed`; :func:`total_nbytes` sums the ranks' bytes).
    """
    from .attention import attach, original_attn_implementation
    from .cache import SqueezeCache
    from .distributed import bind as bind_tp
    from .distributed import check_methods as check_tp_methods
    from .distributed import tensor_parallel
    from .models import arch_spec

    arch_spec(model.config)  # an unsupported model fails here, before a method calibrates or loads anything
    backend = attn_backend
    if backend is None:
        backend = "eager" if original_attn_implementation(model) == "eager" else "sdpa"
    cache = SqueezeCache(
        model.config,
        method,
        budget,
        allocation,
        method_params=method_params,
        allocation_params=allocation_params,
        plan=plan,
        evict_every=evict_every,
        attn_backend=backend,
        channel=channel,
        channel_params=channel_params,
        crosslayer=crosslayer,
        crosslayer_params=crosslayer_params,
    )
    tp = tensor_parallel(model)  # None unless transformers sharded the model (tensor parallelism)
    if tp is not None:
        check_tp_methods(cache, tp)
    for extra in (cache.crosslayer, cache.channel):
        if extra is not None:
            extra.prepare(model)
    if tp is not None:
        bind_tp(cache, tp)  # this rank's KV heads; the group for decisions that must agree
    attach(model)
    return cache


__all__ = [
    "make_cache",
    "chunked_prefill",
    "attach",
    "detach",
    "SqueezeCache",
    "SqueezeLayer",
    "Budget",
    "BudgetPlan",
    "POLICIES",
    "ALLOCATIONS",
    "policy_names",
    "allocation_names",
    "describe",
    "allocated_nbytes",
    "dynamic_cache_nbytes",
    "total_nbytes",
    "total_kv_nbytes",
    "left_pad",
]
