"""From a :class:`~squeezekv.spec.CacheSpec` to a live cache: the registry builds the parts, the cache takes them.

:func:`build_parts` makes the policy, allocation, channel and cross-layer objects a spec names (through the
registry, which loads the method modules); :func:`build_cache` makes a :class:`~squeezekv.cache.SqueezeCache` for a
model config without touching a model; :func:`make_cache` (exported as ``squeezekv.make_cache``) also attaches
squeezekv's attention function and hooks to the model, prepares channel / cross-layer methods on it and binds a
tensor-parallel model's group. ``cache.py`` imports no registry: it receives built objects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from .spec import CacheSpec

if TYPE_CHECKING:
    from .cache import SqueezeCache
    from .plan import BudgetPlan


def build_parts(spec: CacheSpec) -> dict[str, Any]:
    """The objects ``spec`` names: ``{"policy", "allocation", "channel", "crosslayer"}`` (the last two may be
    ``None``); unknown names and bad parameters raise ``ValueError``/``TypeError`` naming them."""
    from .registry import make_allocation, make_channel, make_crosslayer, make_policy

    return {
        "policy": make_policy(spec.method, **spec.method_params),
        "allocation": make_allocation(spec.allocation, **spec.allocation_params),
        "channel": None if spec.channel is None else make_channel(spec.channel, **spec.channel_params),
        "crosslayer": None if spec.crosslayer is None else make_crosslayer(spec.crosslayer, **spec.crosslayer_params),
    }


def build_cache(config: Any, spec: CacheSpec | str | Mapping[str, Any] | None = None, *,
                plan: BudgetPlan | None = None, attn_backend: str = "sdpa", **changes: Any) -> SqueezeCache:
    """A :class:`SqueezeCache` for a model of ``config`` as ``spec`` (+ ``changes``, see :meth:`CacheSpec.of`)
    describes it; the model is not touched (use :func:`make_cache` for a cache to run a model with)."""
    from .cache import SqueezeCache

    spec = CacheSpec.of(spec, **changes)
    cache = SqueezeCache(config, budget=spec.budget, plan=plan, evict_every=spec.evict_every,
                         attn_backend=attn_backend, **build_parts(spec))
    cache.spec = spec
    return cache


def make_cache(
    model: Any,
    spec: CacheSpec | str | Mapping[str, Any] | None = None,
    budget: float | int | str | None = None,
    allocation: str | None = None,
    *,
    plan: BudgetPlan | None = None,
    attn_backend: str | None = None,
    **changes: Any,
) -> SqueezeCache:
    """A fresh compressed cache for one ``generate``/forward pass of ``model`` (attaches squeezekv to the model).

    ``spec``: a :class:`CacheSpec`, its text form (``"method=snapkv budget=0.3 channel=kivi channel.bits=2"``), a
    bare method name, or ``None`` for the defaults (SnapKV, half of the prompt, the SqueezeAttention allocation);
    ``budget``, ``allocation`` and any other :class:`CacheSpec` field given by keyword (``method_params``,
    ``channel``, ``channel_params``, ``crosslayer``, ``evict_every``, ...) replace the spec's. So
    ``make_cache(model, "h2o", 0.2, "uniform")`` and ``make_cache(model, CacheSpec(method="h2o", budget=0.2,
    allocation="uniform"))`` are the same cache. ``budget``: fraction of the prompt in (0, 1] (1.0: evict nothing)
    or tokens >= 1 per layer on average (capped at the model's context); ``plan``: a fixed :class:`BudgetPlan`
    instead of one derived from the prompt; ``attn_backend``: ``"sdpa"`` or ``"eager"`` math (default: what the
    model used before). ``cache.spec`` is the spec the cache was built from.

    On a model sharded by transformers' tensor parallelism, call it on every rank: the cache holds the rank's KV
    heads (:mod:`squeezekv.distributed`; :func:`squeezekv.total_nbytes` sums the ranks' bytes).
    """
    from .attention import attach, original_attn_implementation
    from .distributed import bind as bind_tp
    from .distributed import check_methods as check_tp_methods
    from .distributed import tensor_parallel
    from .models import arch_spec

    spec = CacheSpec.of(spec, budget=budget, allocation=allocation, **changes)
    arch_spec(model.config)  # an unsupported model fails here, before a method calibrates or loads anything
    backend = attn_backend
    if backend is None:
        backend = "eager" if original_attn_implementation(model) == "eager" else "sdpa"
    cache = build_cache(model.config, spec, plan=plan, attn_backend=backend)
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
