"""Shared Attention: the layers of a span reuse the softmax attention weights of the span's first layer and keep no
key cache.

Paper: Liao & Vargas, "Beyond KV Caching: Shared Attention for Efficient LLMs", arXiv 2407.12866 (Neurocomputing
2025). The paper observes that, after pretraining, the post-softmax attention weights of many (mostly later) layers
are nearly the same ("isotropic"), so a layer can use the weights an earlier layer computed: ``out_l = A_s V_l``
with ``A_s = softmax(Q_s K_s^T / sqrt(d))`` of the source layer ``s``. The official code (metacarbon/shareAtt,
``modeling_llama.py``) does it training-free: a shared layer takes the weights of the nearest earlier non-shared
layer and caches only its values. Which spans are safe is read from a similarity analysis of the weights
(``squeezekv analyze-layers``, :mod:`squeezekv.crosslayer.analyze`).

Parameters:

* ``spans``: ``[[first, last], ...]`` ranges of consecutive layers (inclusive). ``first`` computes its weights,
  ``first + 1 .. last`` reuse them. A span of one layer shares nothing. Or the path of a JSON file written by
  ``analyze-layers`` (its ``"spans"``, or with ``shared_layers`` its proposal for that many shared layers).
* ``shared_layers``: with a JSON file, take its proposal ``spans_by_count[shared_layers]``.

What is saved, and what is not: a shared layer stores no keys (its cache holds values and squeezekv's token indices
only) and skips ``QK^T`` and the softmax. squeezekv does not edit model code, so the model still computes the
shared layers' query and key projections (and RoPE); their keys are dropped by the cache. The source layer computes
its weights explicitly (float32 softmax, eager math) because it must hand them on.

Composition with eviction: the source's weights are over the tokens the source holds, so a shared layer must hold
exactly those tokens. It never selects on its own: when the source evicts with indices ``idx``, its sharers gather
their values with the same ``idx`` (per batch row and KV head), and the budget plan gives every layer of a span one
budget (:meth:`SharedAttention.tied_layers`; a given plan that does not is refused).

Composition with a channel method (``kivi``, ``coupled``): the source and shared layer classes are *roles* mixed in
front of the method's layer class (:meth:`CrossLayerMethod.layer`, :meth:`ChannelMethod.make_layer`). The source
stores quantised keys+values as the method does and hands on its softmax weights over every held position (the
quantised keys dequantised block by block, :meth:`QuantizedLayer.weight_chunks`); a shared layer
(``stores_keys = False``) stores its values as the method quantises them (KIVI: per token; CQ: its value codebooks)
plus the full-precision residual, no key codes or scales, and returns ``weights @ values`` block by block over its
dequantised values (:meth:`SqueezeLayer.value_blocks`). Source and sharers hold the same tokens and apply the same
residual/flush rule, so their quantised/residual split is the same. ``eigen`` refuses (its layer projects in
``update``/``attend``, which a role would bypass).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..attention_math import EAGER_BLOCK, weight_chunks
from ..cache import SqueezeCache, SqueezeLayer
from ..registry import register_crosslayer
from .base import CrossLayerMethod


def load_spans(spans: Any, shared_layers: int | None = None) -> tuple[tuple[int, int], ...]:
    """Normalise ``spans`` (a list of ``[first, last]`` pairs, or a JSON file from ``analyze-layers``) and check
    them: integers, ``0 <= first <= last``, no overlap. Raises ``ValueError``."""
    if isinstance(spans, (str, Path)):
        path = Path(spans)
        if not path.is_file():
            raise ValueError(f"shared_attention spans={str(spans)!r}: no such file (give [[first, last], ...] or the "
                             "JSON written by `squeezekv analyze-layers`)")
        data = json.loads(path.read_text())
        if shared_layers is not None:
            table = data.get("spans_by_count", {})
            if str(shared_layers) not in table:
                raise ValueError(f"{path} has no proposal for shared_layers={shared_layers}; it has: "
                                 f"{', '.join(sorted(table, key=int)) or 'none'}")
            spans = table[str(shared_layers)]
        else:
            spans = data.get("spans")
    elif shared_layers is not None:
        raise ValueError("shared_attention shared_layers= needs spans= to be the JSON file of `analyze-layers`")
    if not isinstance(spans, (list, tuple)):
        raise ValueError(f"shared_attention spans={spans!r} must be a list of [first, last] layer ranges")
    out = []
    for span in spans:
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
            raise ValueError(f"shared_attention span {span!r} must be a pair of layer indices [first, last]")
        first, last = span
        if not 0 <= first <= last:
            raise ValueError(f"shared_attention span {list(span)} is out of range: need 0 <= first <= last")
        out.append((first, last))
    out.sort()
    for (a0, a1), (b0, b1) in zip(out, out[1:]):
        if b0 <= a1:
            raise ValueError(f"shared_attention spans {[a0, a1]} and {[b0, b1]} overlap: a layer has one source")
    return tuple(out)


@register_crosslayer("shared_attention")
@dataclass
class SharedAttention(CrossLayerMethod):
    paper = "Liao & Vargas 2024, arXiv 2407.12866"
    summary = "layers of a span reuse the first layer's softmax weights; no key cache for them (values only)"
    spans: Any = ()
    shared_layers: int | None = None

    def __post_init__(self) -> None:
        self._spans = load_spans(self.spans, self.shared_layers)
        self._source_of = {i: a for a, b in self._spans for i in range(a + 1, b + 1)}
        if not self._spans:  # no span: the method would silently change nothing
            raise ValueError(
                f"shared_attention spans={self.spans!r} share no layer: give spans=[[first, last], ...], "
                "or spans=FILE from `squeezekv analyze-layers --model MODEL --out DIR` "
                "(spans=DIR/layer_similarity.json, plus shared_layers=N to pick its proposal for N shared layers, or "
                "a lower --threshold if it proposed none)"
            )
        self._last_of = {a: b for a, b in self._spans if b > a}  # source -> last layer of its span

    @property
    def span_list(self) -> list[list[int]]:
        return [[a, b] for a, b in self._spans]

    @property
    def shared(self) -> list[int]:
        """The layers that reuse another layer's weights (and hold no keys)."""
        return sorted(self._source_of)

    def bind(self, cache: SqueezeCache) -> None:
        n = len(cache.layers)
        for a, b in self._spans:
            if b >= n:
                raise ValueError(f"shared_attention span {[a, b]} is out of range: the model has {n} layers "
                                 f"(0..{n - 1})")
            if b == a:
                continue
            for i in range(a, b + 1):
                if i not in cache.managed:
                    raise ValueError(
                        f"shared_attention span {[a, b]} covers layer {i} of type {cache.layer_types[i]!r}, which "
                        "squeezekv does not manage (e.g. a sliding-window layer of a hybrid model): spans may only "
                        "cover full-attention layers"
                    )

    def make_layer(self, cache: SqueezeCache, layer_idx: int) -> SqueezeLayer | None:
        if layer_idx in self._source_of:
            src = self._source_of[layer_idx]
            return self.layer(cache, SharedLayer, layer_idx, source_idx=src, last=layer_idx == self._last_of[src])
        if layer_idx in self._last_of:
            return self.layer(cache, SourceLayer, layer_idx)
        return None

    def tied_layers(self) -> list[tuple[int, ...]]:
        return [tuple(range(a, b + 1)) for a, b in self._spans if b > a]

    def describe(self) -> str:
        return f"{self.name}(spans={self.span_list})"


class SharedWeights:
    """One forward step's softmax weights of a source layer, ``[B, Hkv, G, q, n]`` (float32) in query chunks, over
    every position the source holds (with a channel method: its quantised positions' keys dequantised block by block,
    :meth:`SqueezeLayer.weight_chunks`).

    Kept as tensors when they fit one chunk (decoding, short prompts); for a long prompt only the inputs are kept and
    each layer of the span recomputes the chunks (the same arithmetic, so the same weights), which bounds memory at
    the price of the prompt's ``QK^T`` per shared layer. The inputs are then the source's keys of this step
    (:meth:`SqueezeLayer.attention_keys`: a dequantised copy if some are quantised, as SnapKV's scoring of a prompt
    chunk), since the source evicts and quantises before the shared layers attend."""

    def __init__(self, layer: SqueezeLayer, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None,
                 scaling: float):
        b, hq, q_len, _ = query.shape
        self.hq, self.q_len, self.n = hq, q_len, layer.physical_length
        one_chunk = max(1, EAGER_BLOCK // max(1, b * hq * self.n)) >= q_len
        self._chunks = list(layer.weight_chunks(query, key, allowed, scaling)) if one_chunk else None
        # held only to recompute (keeps the source's pre-eviction keys)
        self._args = None if one_chunk else (query, layer.attention_keys(), allowed, scaling)

    def chunks(self):
        return self._chunks if self._chunks is not None else weight_chunks(*self._args)

    def apply(self, layer: SqueezeLayer, dtype: torch.dtype) -> torch.Tensor:
        """``weights @ values`` of ``layer`` (its :meth:`SqueezeLayer.value_blocks`, ``[B, Hkv, n, Dv]`` in all)
        -> ``[B, Hq, q, Dv]`` in ``dtype`` (float32 weights, cast to the values' dtype for the product)."""
        if layer.physical_length != self.n:
            raise RuntimeError(f"layer {layer.layer_idx} holds {layer.physical_length} tokens but its span's weights "
                               f"cover {self.n}: a shared layer must hold exactly its source's tokens")
        outs = []
        for _, _, w in self.chunks():
            m = w.shape[-1]  # causal chunks stop at their last query's own key
            # the product in the values' dtype (as the official code: weights cast to the model dtype), so a bf16
            # cache is read once, not copied to float32 every step; blocks (quantised values) summed in float32
            parts = [torch.einsum("bhgqn,bhnd->bhgqd", w[..., start:min(end, m)].to(v.dtype),
                                  v[:, :, : min(end, m) - start])
                     for start, end, v in layer.value_blocks() if start < m]
            outs.append(parts[0] if len(parts) == 1 else sum(p.float() for p in parts))
        b, dv = outs[0].shape[0], outs[0].shape[-1]
        return torch.cat(outs, dim=3).reshape(b, self.hq, self.q_len, dv).to(dtype)


class SourceLayer(SqueezeLayer):
    """First layer of a span: attention with explicit softmax weights, handed on to the span's other layers; its
    evictions (``keep``) are recorded so the others keep the same tokens. With a channel method it is mixed in front of
    the method's layer (:meth:`CrossLayerMethod.layer`): storage, eviction and weights over quantised keys are the
    method's."""

    supports_static = False  # its span's layers need explicit weights, which the static path does not hand on
    supports_fill = False  # the span's shared layers cannot be filled with the weights they would reuse

    def __init__(self, cache: SqueezeCache, layer_idx: int, *args: Any, **kwargs: Any):
        super().__init__(cache, layer_idx, *args, **kwargs)
        self.shared: SharedWeights | None = None
        self.last_keep: tuple[int, torch.Tensor] | None = None  # (tokens seen, idx [B, H, k]) of the last eviction

    def attend(self, query, key, value, allowed, scaling):
        self.shared = SharedWeights(self, query, key, allowed, scaling)
        return self.shared.apply(self, query.dtype)

    def keep(self, idx: torch.Tensor) -> None:
        super().keep(idx)
        self.last_keep = (self.seen, idx)

    def reset(self) -> None:
        super().reset()
        self.shared = None
        self.last_keep = None


class SharedLayer(SqueezeLayer):
    """A layer that reuses its source layer's weights: it stores values (``[B, H, n, Dv]``), token indices and the
    padding flags only; ``keys`` is an empty ``[B, H, 0, D]`` tensor (no storage). It keeps exactly the source's
    tokens: it gathers with the indices of the source's last eviction and never consults the policy. With a channel
    method it is mixed in front of the method's layer, which then stores (quantises) the values alone."""

    selects_tokens = False
    stores_keys = False
    supports_static = False  # it reuses its source's weights, which the static path does not compute
    supports_fill = False  # it holds exactly its source's tokens, never given ones

    def __init__(self, cache: SqueezeCache, layer_idx: int, *args: Any, source_idx: int, last: bool, **kwargs: Any):
        super().__init__(cache, layer_idx, *args, **kwargs)
        self.source_idx = source_idx
        self.last_in_span = last
        self._followed = -1  # tokens seen when this layer last copied the source's eviction

    @property
    def source(self) -> SourceLayer:
        return self.cache.layers[self.source_idx]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)  # keys: [B, H, 0, D], no storage
        self.scores = None

    @property
    def physical_length(self) -> int:
        return 0 if self.token_idx is None else self.token_idx.shape[-1]

    def attend(self, query, key, value, allowed, scaling):
        src = self.source
        if src.shared is None:
            raise RuntimeError(f"layer {self.layer_idx} reuses layer {self.source_idx}'s weights, but that layer did "
                               "not attend in this forward pass")
        out = src.shared.apply(self, query.dtype)
        if self.last_in_span:
            src.shared = None  # free the weights (and the source's pre-eviction keys)
        return out

    def after_attention(self, q_len: int) -> None:
        if self.static is not None:
            return
        if self.cache.budget_for(self.layer_idx, self.seen) is None:
            return  # SqueezeAttention: the cache compresses every layer once importance is known
        if not (self.prefill_done and q_len == 1):
            self.prefill_done = True
        self.follow_source()
        self.flush()

    def compress(self, budget: int) -> None:
        self.follow_source()
        self.flush()

    def follow_source(self) -> None:
        """Keep the tokens the source kept at its eviction in this forward step (if it evicted)."""
        last = self.source.last_keep
        if last is None or last[0] != self.seen or self._followed == self.seen:
            return
        self.keep(last[1])
        self._followed = self.seen
        if self.token_idx.shape != self.source.token_idx.shape:
            raise RuntimeError(f"layer {self.layer_idx} and its source {self.source_idx} hold different tokens")

    def reset(self) -> None:
        super().reset()
        self._followed = -1
