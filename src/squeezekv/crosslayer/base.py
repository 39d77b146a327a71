"""What every training-free cross-layer method shares: it decides, per managed layer, whether the layer keeps its own
keys/values or reuses another layer's (attention weights or KV), by choosing that layer's object."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any

from ..registry import Method

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import SqueezeCache, SqueezeLayer


class CrossLayerMethod(Method):
    """Base class of the cross-layer methods (registered with :func:`squeezekv.registry.register_crosslayer`).

    Class attributes ``paper``/``summary`` feed the docs and the README table."""

    @abstractmethod
    def make_layer(self, cache: "SqueezeCache", layer_idx: int) -> "SqueezeLayer | None":
        """The layer object for managed layer ``layer_idx``, or None to let the channel method / default decide."""

    @staticmethod
    def layer(cache: "SqueezeCache", role: type, layer_idx: int, **role_kwargs: Any) -> "SqueezeLayer":
        """A layer of class ``role`` (a :class:`SqueezeLayer` subclass) for ``layer_idx``; with a channel method, the
        method's layer with ``role`` mixed in front (:meth:`ChannelMethod.make_layer`: the role decides attention and
        which tokens are kept, the channel method how they are stored)."""
        if cache.channel is None:
            return role(cache, layer_idx, **role_kwargs)
        return cache.channel.make_layer(cache, layer_idx, role=role, **role_kwargs)

    def bind(self, cache: "SqueezeCache") -> None:
        """Called once the cache's layers exist (``cache.layers``, ``cache.managed``, ``cache.layer_types``): raise
        ``ValueError`` if the method does not fit this model."""

    def tied_layers(self) -> "list[tuple[int, ...]]":
        """Groups of layers that must keep exactly the same tokens: the budget plan gives each group one budget and
        a given plan that does not is refused."""
        return []

    def prepare(self, model: Any) -> None:
        """Called once by :func:`squeezekv.make_cache` with the model."""
