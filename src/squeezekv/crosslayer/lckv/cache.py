"""The condensed KV cache of LCKV (Wu & Tu, ACL 2024, arXiv 2405.10637): only the layers that compute KV
(``config.kv_layers``) hold tensors; every other layer is a transformers ``DummyLayer`` that allocates nothing.

Bytes held = ``len(kv_layers) * 2 * batch * kv_heads * tokens * head_dim * dtype_bytes`` (:func:`expected_nbytes`),
against ``num_hidden_layers * ...`` for a standard model.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DummyLayer, DynamicCache

from .configuration import LCKVConfig


class LCKVCache(DynamicCache):
    """A ``DynamicCache`` built from an :class:`LCKVConfig`: ``DynamicLayer`` for KV-producing layers, ``DummyLayer``
    elsewhere (transformers does this from ``config.kv_sharing_modes``; checked here)."""

    def __init__(self, config: LCKVConfig, channel: str | None = None, channel_params: dict | None = None):
        """``channel``/``channel_params``: a channel method for the KV layers; refused (``ValueError``), see below."""
        if channel is not None:
            raise ValueError(
                f"LCKV does not compose with the channel method {channel!r}: LCKV's attention (LCKVModel._iterate) "
                "reads the full-precision keys/values tensors of its KV layers from the cache and concatenates them "
                "with the block's uncommitted KV in every layer that attends to them, outside squeezekv's attention "
                "function; a quantised layer would have to hand out its whole cache dequantised at every step (peak "
                "memory above the unquantised cache) and its residual flush would never run. See docs/crosslayer.md, "
                "'LCKV and channel methods'"
            )
        if not isinstance(config, LCKVConfig):
            raise TypeError(f"LCKVCache needs an LCKVConfig, got {type(config).__name__}")
        super().__init__(config=config)
        self.kv_layers = config.kv_layers
        for l, layer in enumerate(self.layers):
            holds = not isinstance(layer, DummyLayer)
            if holds != (l in self.kv_layers):
                raise RuntimeError(f"cache layer {l} is {type(layer).__name__}, "
                                   f"expected KV storage={l in self.kv_layers}")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached (read from the first KV-producing layer when ``layer_idx`` holds no KV)."""
        if layer_idx >= len(self.layers) or isinstance(self.layers[layer_idx], DummyLayer):
            layer_idx = self.kv_layers[0]
        return self.layers[layer_idx].get_seq_length()

    def nbytes(self) -> int:
        """Bytes of the key/value tensors really allocated, summed over layers."""
        return sum(layer_nbytes(layer) for layer in self.layers)


def layer_nbytes(layer: object) -> int:
    """Bytes of the storage behind one cache layer's keys and values (0 for a ``DummyLayer`` or an empty layer)."""
    total = 0
    for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if isinstance(t, torch.Tensor):
            total += t.untyped_storage().nbytes()
    return total


def cache_nbytes(cache: object) -> int:
    """Bytes of keys/values held by any transformers cache (sum over its layers)."""
    return sum(layer_nbytes(layer) for layer in getattr(cache, "layers", []))


def expected_nbytes(config: LCKVConfig, batch: int, tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """The formula: ``kv_layers * 2 (K and V) * batch * kv_heads * tokens * head_dim * bytes per element``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return len(config.kv_layers) * 2 * batch * config.num_key_value_heads * tokens * head_dim * elem


def kv_bytes_per_token(config: LCKVConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """KV bytes one token costs in the condensed cache (batch 1)."""
    return expected_nbytes(config, 1, 1, dtype)
