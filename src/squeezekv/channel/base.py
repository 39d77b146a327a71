"""What every channel-dimension method shares: it shrinks each cached token (fewer channels, fewer bits) by choosing
the layer object that stores a managed layer's keys/values. Eviction and layer budgets run first; the survivors are
stored compressed."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any

from ..registry import Method

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import SqueezeCache, SqueezeLayer


class ChannelMethod(Method):
    """Base class of the channel-dimension methods (registered with :func:`squeezekv.registry.register_channel`).

    Class attributes ``paper``/``summary`` feed the docs and the README table."""

    @abstractmethod
    def make_layer(self, cache: "SqueezeCache", layer_idx: int) -> "SqueezeLayer":
        """The layer object that stores managed layer ``layer_idx`` of ``cache``."""

    def prepare(self, model: Any) -> None:
        """Called once by :func:`squeezekv.make_cache` with the model (e.g. to load or check a calibration)."""
