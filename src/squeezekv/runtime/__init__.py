"""The decode runtime: a slot-based KV pool (:mod:`.pool`), a decode attention over the filled entries of each slot
(:mod:`.decode_attention`, with a Triton split-K kernel in :mod:`.decode_triton`) and a batched, fixed-shape decode step
driven through transformers' own cache and attention hooks (:mod:`.runtime`).

Nothing is imported eagerly (``import squeezekv`` stays light): import the submodules, e.g.
``from squeezekv.runtime.runtime import DecodeRuntime``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "KVPool": "pool", "pool_capacities": "pool", "decode_attention": "decode_attention", "KiviPool": "kivi_pool",
    "pool_for_cache": "pools",
    "DecodeRuntime": "runtime", "PoolCache": "runtime",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
