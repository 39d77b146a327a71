"""What every channel-dimension method shares: it shrinks each cached token (fewer channels, fewer bits) by choosing
the layer object that stores a managed layer's keys/values. Eviction and layer budgets run first; the survivors are
stored compressed."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

from ..registry import Method

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import SqueezeCache, SqueezeLayer


@cache
def mixed_layer_class(role: type, storage: type) -> type:
    """``role`` (a cross-layer method's layer class, a :class:`SqueezeLayer` subclass that overrides attention and
    eviction) in front of ``storage`` (a channel method's layer class, which overrides how tokens are stored): the
    role's methods reach the storage through ``super()``. One class per pair."""
    return type(f"{role.__name__}[{storage.__name__}]", (role, storage), {})


class ChannelMethod(Method):
    """Base class of the channel-dimension methods (registered with :func:`squeezekv.registry.register_channel`).

    Class attributes ``paper``/``summary`` feed the docs and the README table; ``layer_class`` is the layer that
    stores a managed layer, built as ``layer_class(cache, layer_idx, method)``."""

    layer_class: ClassVar[type]

    def make_layer(self, cache: "SqueezeCache", layer_idx: int, role: type | None = None,
                   **role_kwargs: Any) -> "SqueezeLayer":
        """The layer object that stores managed layer ``layer_idx`` of ``cache``.

        ``role``: a cross-layer method's layer class (e.g. Shared Attention's source or shared layer) mixed in front
        of :attr:`layer_class` (:func:`mixed_layer_class`), with its keyword arguments ``role_kwargs``; a role with
        ``stores_keys = False`` gets a layer that stores (and compresses) values only. A method whose layer cannot
        take a role overrides this and raises ``ValueError``."""
        cls = self.layer_class if role is None else mixed_layer_class(role, self.layer_class)
        return cls(cache, layer_idx, self, **role_kwargs)

    def prepare(self, model: Any) -> None:
        """Called once by :func:`squeezekv.make_cache` with the model (e.g. to load or check a calibration)."""

    def shard_heads(self, start: int, stop: int, total: int) -> None:
        """Keep only what KV heads ``start:stop`` of ``total`` need: the model is sharded by tensor parallelism and
        this rank's cache holds those heads (:mod:`squeezekv.distributed`). Extension point: a method with per-head
        tables (codebooks, bases) calibrated on the unsharded model cuts them; nothing for a method without."""
