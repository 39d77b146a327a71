"""squeezekv: KV-cache compression along the sequence and across layers for Hugging Face transformers models.

One line::

    out = model.generate(**inputs, past_key_values=squeezekv.make_cache(model, method="snapkv", budget=0.2,
                                                                         allocation="squeeze"))
"""

from __future__ import annotations

from typing import Any

from .attention import attach, detach, original_attn_implementation
from .cache import SqueezeCache, SqueezeLayer, dynamic_cache_nbytes
from .distributed import bind as bind_tp
from .distributed import check_methods as check_tp_methods
from .distributed import tensor_parallel, total_kv_nbytes, total_nbytes
from .inputs import left_pad
from .plan import Budget, BudgetPlan
from .prefill import chunked_prefill
from .registry import ALLOCATIONS, POLICIES, allocation_names, describe, policy_names

__version__ = "0.1.0"


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

    ``method``: eviction policy (:func:`policy_names`); ``budget``: fraction of the prompt in (0, 1] or tokens >= 1
    per layer on average; ``allocation``: how the total is split across layers (:func:`allocation_names`);
    ``method_params``/``allocation_params``: the method's parameters; ``plan``: a fixed :class:`BudgetPlan` instead of
    one derived from the prompt; ``evict_every``: decoding steps between evictions for policies that keep evicting;
    ``attn_backend``: ``"sdpa"`` or ``"eager"`` math (default: what the model used before); ``channel``/
    ``crosslayer`` (+ ``_params``): a channel method (fewer bits or channels per token) and a training-free
    cross-layer method, composed with the eviction policy (:func:`squeezekv.describe` lists them).

    On a model sharded by transformers' tensor parallelism, call it on every rank: the cache holds the rank's KV
    heads (:mod:`squeezekv.distributed`; :func:`total_nbytes` sums the ranks' bytes).
    """
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
    "dynamic_cache_nbytes",
    "total_nbytes",
    "total_kv_nbytes",
    "left_pad",
]
