"""squeezekv: KV-cache compression along the sequence and across layers for Hugging Face transformers models.

One line::

    out = model.generate(**inputs, cache=squeezekv.make_cache(model, "method=snapkv budget=0.2 allocation=squeeze"))

(the same as ``make_cache(model, "snapkv", 0.2, "squeeze")`` or ``make_cache(model, CacheSpec(budget=0.2))``:
:class:`CacheSpec` is the one description of a compressed cache every entry point takes.)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registry import allocation_names, describe, policy_names

if TYPE_CHECKING:
    from .attention import attach, detach
    from .build import build_cache, make_cache
    from .cache import SqueezeCache, SqueezeLayer, allocated_nbytes, dynamic_cache_nbytes
    from .distributed import total_kv_nbytes, total_nbytes
    from .inputs import left_pad
    from .plan import Budget, BudgetPlan
    from .prefill import chunked_prefill
    from .registry import ALLOCATIONS, POLICIES
    from .spec import CacheSpec

__version__ = "0.1.0"

# Imported on first use (PEP 562), so that ``import squeezekv`` (and the command line's help) imports neither torch
# nor transformers: name -> the submodule defining it.
_LAZY = {
    "attach": "attention", "detach": "attention", "SqueezeCache": "cache", "SqueezeLayer": "cache",
    "dynamic_cache_nbytes": "cache", "allocated_nbytes": "cache", "left_pad": "inputs", "Budget": "plan",
    "BudgetPlan": "plan", "total_nbytes": "distributed", "total_kv_nbytes": "distributed",
    "chunked_prefill": "prefill", "make_cache": "build", "build_cache": "build", "CacheSpec": "spec",
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


__all__ = [
    "make_cache",
    "build_cache",
    "CacheSpec",
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
