"""Configuration of the Layer-Condensed KV cache model (LCKV; Wu & Tu, "Layer-Condensed KV Cache for Efficient
Inference of Large Language Models", ACL 2024, arXiv 2405.10637).

A Llama-architecture config plus one integer per layer, ``kv_sources[l]``: the layer whose keys/values layer ``l``
attends to. Three layouts are built by :func:`make_kv_sources`:

* ``"standard"``: ``[0, 1, ..., L-1]`` — every layer attends to its own KV (a plain Llama).
* ``"top"``: the paper's LCKV. The bottom ``warmup`` layers are standard ("warm-up layers"); every other layer attends
  to the KV of the top layer ``L-1``.
* ``"sandwich"``: ``warmup`` standard layers split between the bottom (``ceil(warmup/2)``) and the top
  (``floor(warmup/2)``); the middle layers attend to the KV of the highest middle layer, e.g. ``L=8, warmup=2`` gives
  ``[0, 6, 6, 6, 6, 6, 6, 7]`` (the reference code's ``"0_6_6_6_6_6_6_7"``).

A layer ``s`` that is anybody's source must attend to itself (``kv_sources[s] == s``): only such layers compute and
cache KV. A layer whose source is above it (``kv_sources[l] > l``) attends to the source KV of *earlier tokens only*
(the diagonal is masked, paper section 2.1), which makes the whole stack recurrent over tokens; training and prompt
encoding resolve it with ``forward_passes`` (paper's ``m``, default 7) iterations without gradients followed by
``backward_passes`` (paper's ``b``, default 2) iterations with gradients (paper section 2.2).
"""

from __future__ import annotations

from typing import Any, Sequence

from transformers import LlamaConfig

LAYOUTS = ("standard", "top", "sandwich")


def make_kv_sources(num_layers: int, layout: str = "top", warmup: int = 2) -> list[int]:
    """The per-layer KV source map of ``layout`` (one of :data:`LAYOUTS`) for ``num_layers`` layers."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LCKV layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    if layout == "standard":
        return list(range(num_layers))
    if not isinstance(warmup, int) or not 0 <= warmup < num_layers:
        raise ValueError(f"warmup must be an int in [0, {num_layers - 1}] for {num_layers} layers, got {warmup!r}")
    if layout == "top":
        top = num_layers - 1
        return [l if l < warmup else top for l in range(num_layers)]
    bottom = (warmup + 1) // 2
    upper = warmup - bottom
    kv_layer = num_layers - 1 - upper  # highest middle layer
    return [l if (l < bottom or l > kv_layer) else kv_layer for l in range(num_layers)]


def check_kv_sources(kv_sources: Sequence[int], num_layers: int) -> list[int]:
    """Validate a KV source map (raises ``ValueError`` naming the bad entry) and return it as a list of ints."""
    out = list(kv_sources)
    if len(out) != num_layers:
        raise ValueError(f"kv_sources has {len(out)} entries for {num_layers} layers: {out}")
    for l, s in enumerate(out):
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < num_layers:
            raise ValueError(f"kv_sources[{l}] = {s!r} is not a layer index in [0, {num_layers - 1}]")
        if out[s] != s:
            raise ValueError(
                f"kv_sources[{l}] = {s}, but layer {s} attends to layer {out[s]}: a KV source must attend to itself"
            )
    return out


class LCKVConfig(LlamaConfig):
    """Llama config + LCKV fields (see the module docstring).

    ``kv_sources``: per-layer source layer (default: standard layout); ``forward_passes``: iterations without gradient
    (paper's m=7); ``backward_passes``: iterations with gradient (paper's b=2).
    """

    model_type = "squeezekv_lckv"

    def __init__(
        self,
        kv_sources: Sequence[int] | None = None,
        forward_passes: int = 7,
        backward_passes: int = 2,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if kv_sources is None:
            kv_sources = list(range(self.num_hidden_layers))
        self.kv_sources = check_kv_sources(kv_sources, self.num_hidden_layers)
        for name, value, low in (("forward_passes", forward_passes, 0), ("backward_passes", backward_passes, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.forward_passes = forward_passes
        self.backward_passes = backward_passes
        # transformers builds a DummyLayer (no storage) for layers marked "reuse" when it makes a DynamicCache
        # from this config, so generate() allocates KV only for the layers that produce it.
        self.kv_sharing_modes = ["compute" if s == l else "reuse" for l, s in enumerate(self.kv_sources)]

    @property
    def kv_layers(self) -> list[int]:
        """Indices of the layers that compute and cache KV."""
        return [l for l, s in enumerate(self.kv_sources) if s == l]

    @property
    def is_recurrent(self) -> bool:
        """True when some layer attends to a layer above it (iterative training/prompt encoding needed)."""
        return any(s > l for l, s in enumerate(self.kv_sources))
