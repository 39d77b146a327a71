"""A cache's state as plain data (:class:`KVSnapshot`): capture it from a live cache, restore a live cache from it,
serialise it to bytes, crop it to a prefix, and shift it to earlier positions after truncation.

Compressed caches are captured as they are (only the tokens each layer kept, plus their logical indices, scores and
budget plan; a KIVI layer's packed codes, scales/zeros, group ids and full-precision residual; :func:`capture` raises
``TypeError`` naming any other layer type, which it could not restore exactly), so a compressed conversation costs
its compressed size in every tier, and the restored cache continues exactly as the original object would have
(CachedAttention, Gao et al., USENIX ATC 2024, arXiv 2403.19708, stores the full KV; storing the compressed one is
squeezekv's addition).

Truncation follows the paper's section on context-window overflow: when the oldest ``drop`` tokens are cut, the kept
keys, cached after RoPE at positions ``p``, are re-rotated to ``p - drop`` (RoPE is a rotation, so
``R(p - drop) k = R(-drop) R(p) k``), instead of being recomputed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from ..attention import attach
from ..build import build_cache
from ..cache import SqueezeCache, SqueezeLayer
from ..plan import BudgetPlan
from ..spec import CacheSpec

#: tensors a :class:`~squeezekv.SqueezeLayer` carries between forward passes (``valid`` is rebuilt from the mask)
_SQUEEZE_TENSORS = ("keys", "values", "token_idx", "scores")
_SQUEEZE_META = ("seen", "compressed", "prefill_done")
#: why the layer classes the store does not save cannot be restored from keys, values and bookkeeping alone
_REFUSED = {
    "CoupledLayer": "its codes index codebooks calibrated for the model, which the snapshot does not hold",
    "EigenLayer": "its keys/values live in a calibrated low-rank basis, which the snapshot does not hold",
    "MiniCacheLayer": "its merged keys/values live in the pair's shared storage (MergedStates), not in the layer",
    "SourceLayer": "a shared-attention source hands its attention weights to the layers of its span",
    "SharedLayer": "a shared-attention layer holds values only and reuses its source's attention weights",
}


def _layer_fields(layer: SqueezeLayer, i: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The tensors and counters that restore layer ``i`` exactly: a plain :class:`~squeezekv.SqueezeLayer`'s, and for
    a KIVI layer also its packed codes, scales/zeros, key group ids and quantised count (``nq``). Any other layer
    class raises ``TypeError`` naming it."""
    from ..channel.kivi import KIVILayer

    cls = type(layer)
    if cls is SqueezeLayer:
        return _SQUEEZE_TENSORS, _SQUEEZE_META
    if cls is KIVILayer:
        return (_SQUEEZE_TENSORS + KIVILayer.token_fields + KIVILayer.table_fields,
                _SQUEEZE_META + ("nq",))
    name = cls.__name__
    reason = next((why for base in cls.__mro__ for key, why in _REFUSED.items() if base.__name__ == key),
                  "the store only knows how to save the layers it names")
    raise TypeError(
        f"store.capture cannot save layer type {name} (layer {i}): {reason}; the layer types saved exactly are "
        "SqueezeLayer (any eviction policy and allocation, no channel or cross-layer method) and KIVILayer "
        "(channel 'kivi' without a cross-layer method), plus transformers' DynamicLayer/DynamicSlidingWindowLayer"
    )


@dataclass
class LayerState:
    """One layer: ``kind`` is ``"squeeze"``, ``"dynamic"`` or ``"sliding"``; ``tensors`` keys/values
    ``[1, H, n, D]`` (and for squeeze layers token_idx ``[1, H, n]`` int32, scores ``[1, H, n]`` float32);
    ``meta`` the layer's counters (seen, compressed, prefill_done; cumulative_length, sliding_window)."""

    kind: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class KVSnapshot:
    """The state of a batch-1 cache after it was fed ``tokens``.

    ``cache_kind``: ``"squeeze"`` (a :class:`~squeezekv.SqueezeCache`, ``config`` holds how to rebuild it) or
    ``"dynamic"`` (transformers' full ``DynamicCache``). ``croppable``: the snapshot of any prefix of ``tokens`` can be
    cut out of it (full cache, every layer holding every token)."""

    tokens: tuple[int, ...]
    cache_kind: str
    layers: list[LayerState]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def croppable(self) -> bool:
        return self.cache_kind == "dynamic" and all(l.kind == "dynamic" for l in self.layers)

    def nbytes(self) -> int:
        """Bytes of every tensor held (what a tier is charged)."""
        return sum(t.numel() * t.element_size() for l in self.layers for t in l.tensors.values())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "KVSnapshot":
        """A copy whose tensors live on ``device`` (pinned host memory when copying off a GPU is the caller's job)."""
        layers = [LayerState(l.kind, {k: t.to(device, non_blocking=non_blocking) for k, t in l.tensors.items()},
                             dict(l.meta)) for l in self.layers]
        return KVSnapshot(self.tokens, self.cache_kind, layers, dict(self.config))

    def crop(self, length: int) -> "KVSnapshot":
        """The snapshot of the first ``length`` tokens (views, no copy). Only for croppable snapshots."""
        if not self.croppable:
            raise ValueError(f"a {self.cache_kind} snapshot with compressed or sliding layers cannot be cropped")
        if not 1 <= length <= len(self.tokens):
            raise ValueError(f"crop length {length} is out of range: 1..{len(self.tokens)}")
        layers = [LayerState("dynamic", {k: t[:, :, :length] for k, t in l.tensors.items()}, {})
                  for l in self.layers]
        return KVSnapshot(self.tokens[:length], self.cache_kind, layers, dict(self.config))

    def device(self) -> torch.device:
        return self.layers[0].tensors["keys"].device


def capture(cache: Cache, tokens: Sequence[int]) -> KVSnapshot:
    """Snapshot of a batch-1 cache that was fed exactly ``tokens``. Keys/values are shared, not copied (caches
    replace those tensors, never write into them); scores, which policies update in place, are copied.

    Saved exactly: transformers' ``DynamicLayer``/``DynamicSlidingWindowLayer``, plain
    :class:`~squeezekv.SqueezeLayer` and KIVI's layer (its quantised tokens too). A layer of any other type (the other
    channel and cross-layer methods) raises ``TypeError`` naming it: nothing is saved that would restore differently."""
    layers: list[LayerState] = []
    for i, layer in enumerate(cache.layers):
        if not getattr(layer, "is_initialized", False):
            raise ValueError(f"layer {i} of the cache holds nothing yet: capture a cache after a forward pass")
        if layer.keys.shape[0] != 1:
            raise ValueError(f"only batch-1 caches are stored; layer {i} has batch {layer.keys.shape[0]}")
        if isinstance(layer, SqueezeLayer):
            names, meta = _layer_fields(layer, i)
            if layer.seen != len(tokens):
                raise ValueError(f"layer {i} has seen {layer.seen} tokens but {len(tokens)} tokens were given")
            tensors = {k: getattr(layer, k) for k in names if getattr(layer, k) is not None}
            if "scores" in tensors:  # H2O/SnapKV update scores in place: the snapshot needs its own copy
                tensors["scores"] = tensors["scores"].clone()
            layers.append(LayerState("squeeze", tensors, {"layer_type": type(layer).__name__,
                                                          **{k: getattr(layer, k) for k in meta}}))
        elif isinstance(layer, DynamicSlidingWindowLayer):
            layers.append(LayerState("sliding", {"keys": layer.keys, "values": layer.values},
                                     {"cumulative_length": layer.cumulative_length,
                                      "sliding_window": layer.sliding_window}))
        elif type(layer) is DynamicLayer:
            if layer.keys.shape[-2] != len(tokens):
                raise ValueError(f"layer {i} holds {layer.keys.shape[-2]} tokens but {len(tokens)} tokens were given")
            layers.append(LayerState("dynamic", {"keys": layer.keys, "values": layer.values}))
        else:
            raise ValueError(f"layer {i} is a {type(layer).__name__}, which the KV store cannot snapshot")
    if isinstance(cache, SqueezeCache):
        if cache.plan is None:
            raise ValueError("the compressed cache has no budget plan yet: capture it after the prompt went through")
        config = {
            "method": cache.policy.name,
            "method_params": dict(vars(cache.policy)),
            "allocation": cache.allocation.name,
            "allocation_params": dict(vars(cache.allocation)),
            "budget": cache.budget.value,
            "budget_is_fraction": cache.budget.is_fraction,
            "evict_every": cache.evict_every,
            "attn_backend": cache.attn_backend,
            "plan": cache.plan.as_dict(),
            # every managed layer passed _layer_fields: a channel method here is KIVI, whose parameters rebuild it
            "channel": None if cache.channel is None else cache.channel.name,
            "channel_params": {} if cache.channel is None else dict(vars(cache.channel)),
        }
        return KVSnapshot(tuple(int(t) for t in tokens), "squeeze", layers, config)
    return KVSnapshot(tuple(int(t) for t in tokens), "dynamic", layers, {})


def _plan(d: dict[str, Any]) -> BudgetPlan:
    details = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d["details"].items()}
    return BudgetPlan(budgets=tuple(d["budgets"]), base=int(d["base"]), allocation=d["allocation"], details=details)


def restore(snapshot: KVSnapshot, model: Any, device: torch.device | str | None = None, clone: bool = True) -> Cache:
    """A live cache equal to the captured one, on ``device`` (default: the snapshot's). Tensors are cloned (unless
    ``clone=False``), so the snapshot can stay in its tier while the cache grows (scores are updated in place)."""
    device = torch.device(device) if device is not None else snapshot.device()
    if snapshot.cache_kind == "squeeze":
        c = snapshot.config
        budget = float(c["budget"]) if c["budget_is_fraction"] else int(c["budget"])
        spec = CacheSpec(method=c["method"], budget=budget, allocation=c["allocation"],
                         method_params=c["method_params"], allocation_params=c["allocation_params"],
                         evict_every=c["evict_every"], channel=c.get("channel"),
                         channel_params=c.get("channel_params") or {})
        cache: Cache = build_cache(model.config, spec, plan=_plan(c["plan"]), attn_backend=c["attn_backend"])
        attach(model)
    elif snapshot.cache_kind == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        raise ValueError(f"snapshot kind {snapshot.cache_kind!r} is unknown: 'squeeze' or 'dynamic'")
    if len(cache.layers) != len(snapshot.layers):
        raise ValueError(f"snapshot has {len(snapshot.layers)} layers but the model's cache has {len(cache.layers)}")
    for i, (layer, state) in enumerate(zip(cache.layers, snapshot.layers)):
        expected = {DynamicSlidingWindowLayer: "sliding", DynamicLayer: "dynamic"}.get(
            type(layer), "squeeze" if isinstance(layer, SqueezeLayer) else None)
        if expected != state.kind:
            raise ValueError(f"layer {i}: snapshot holds a {state.kind!r} layer, the model's cache a {expected!r} one")
        saved_type = state.meta.get("layer_type", "SqueezeLayer")
        if expected == "squeeze" and type(layer).__name__ != saved_type:
            raise ValueError(f"layer {i}: snapshot holds a {saved_type}, the rebuilt cache a {type(layer).__name__}")
        tensors = {name: t.to(device, copy=clone) if clone or t.device != device else t
                   for name, t in state.tensors.items()}
        if type(layer) is SqueezeLayer:  # the public way in (scores are copied: policies update them in place)
            layer.fill(tensors["keys"], tensors["values"], tensors["token_idx"], tensors.get("scores"),
                       seen=state.meta["seen"])
            continue
        # a KIVI layer (its packed codes, scales/zeros and group ids as they were saved) or a transformers layer
        for name, t in tensors.items():
            setattr(layer, name, t)
        for name, v in state.meta.items():
            if name not in ("sliding_window", "layer_type"):
                setattr(layer, name, v)
        if isinstance(layer, SqueezeLayer):
            layer.dtype = layer.values.dtype  # what a quantised layer dequantises to (set by lazy_initialization)
        layer.device = device
        layer.is_initialized = True
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer._sliding_window_tensor = layer._sliding_window_tensor.to(device)
    return cache


# -- bytes --------------------------------------------------------------------------------------------------------
def to_bytes(snapshot: KVSnapshot) -> bytes:
    """Serialise (tensors moved to the CPU). Read back with :func:`from_bytes`."""
    payload = {
        "tokens": list(snapshot.tokens),
        "cache_kind": snapshot.cache_kind,
        "config": snapshot.config,
        "layers": [{"kind": l.kind, "meta": l.meta, "tensors": {k: t.detach().cpu() for k, t in l.tensors.items()}}
                   for l in snapshot.layers],
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> KVSnapshot:
    """Inverse of :func:`to_bytes` (``weights_only`` loading: no code is executed)."""
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    layers = [LayerState(l["kind"], dict(l["tensors"]), dict(l["meta"])) for l in payload["layers"]]
    return KVSnapshot(tuple(payload["tokens"]), payload["cache_kind"], layers, payload["config"])


# -- truncation ---------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def shift_positions(snapshot: KVSnapshot, model: Any, drop: int) -> KVSnapshot:
    """Cut the oldest ``drop`` tokens and re-rotate the kept keys from positions ``p`` to ``p - drop``.

    For a one-layer model this equals recomputing the truncated history; in deeper models the kept tokens' hidden
    states still carry what the dropped tokens contributed (the paper's accepted approximation). Needs a full,
    uncompressed snapshot and a model whose rotary embedding covers the whole head dimension without scaling."""
    if not snapshot.croppable:
        raise ValueError("only a full (uncompressed, non-sliding) snapshot can be truncated by re-rotation")
    if not 1 <= drop < len(snapshot.tokens):
        raise ValueError(f"drop={drop} is out of range: 1..{len(snapshot.tokens) - 1}")
    inner = getattr(model, "model", model)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__} has no model.rotary_emb: cannot re-rotate its keys")
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise ValueError(f"rotary attention_scaling={rotary.attention_scaling} != 1: re-rotation would rescale keys")
    layers = []
    for state in snapshot.layers:
        keys = state.tensors["keys"][:, :, drop:]  # [1, H, n - drop, D]
        pos = torch.full((1, 1), -drop, dtype=torch.long, device=keys.device)
        cos, sin = rotary(keys.float(), pos)  # [1, 1, D]
        if cos.shape[-1] != keys.shape[-1]:
            raise ValueError(f"rotary dim {cos.shape[-1]} != head dim {keys.shape[-1]}: partial RoPE is not supported")
        cos, sin = cos[:, None], sin[:, None]  # [1, 1, 1, D]
        k = keys.float()
        rotated = (k * cos + _rotate_half(k) * sin).to(keys.dtype)
        layers.append(LayerState("dynamic", {"keys": rotated.contiguous(),
                                             "values": state.tensors["values"][:, :, drop:].contiguous()}))
    return KVSnapshot(snapshot.tokens[drop:], snapshot.cache_kind, layers, dict(snapshot.config))


__all__ = ["LayerState", "KVSnapshot", "capture", "restore", "to_bytes", "from_bytes", "shift_positions"]
