"""The pool for a prefilled request, whatever its storage: :class:`~squeezekv.runtime.pool.KVPool` for plain
squeezekv caches (and the full cache), :class:`~squeezekv.runtime.kivi_pool.KiviPool` for KIVI caches."""

from __future__ import annotations

from typing import Any

from .kivi_pool import KiviPool
from .pool import KVPool


def pool_for_cache(cache: Any, max_seqs: int, max_new_tokens: int) -> KVPool:
    """A pool of ``max_seqs`` slots shaped after the prefilled ``cache`` (``KVPool.for_cache`` or
    ``KiviPool.for_cache``), with room for ``max_new_tokens`` generated tokens per slot."""
    layers = list(getattr(cache, "layers", []))
    if layers and getattr(layers[0], "method_name", None) == "kivi":
        return KiviPool.for_cache(cache, max_seqs, max_new_tokens)
    return KVPool.for_cache(cache, max_seqs, max_new_tokens)


__all__ = ["pool_for_cache"]
