"""MiniCache: adjacent deep layers share one KV direction per token; each layer keeps its own magnitudes; tokens whose
two layers disagree too much are kept unmerged.

Paper: Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models", NeurIPS 2024,
arXiv 2405.14366. Recipe (Sec. 4), applied separately to keys and to values of a pair of layers ``(l, l+1)``:

* magnitude/direction: ``x = ||x|| * x / ||x||`` for every token vector of both layers;
* merge: one shared direction per token by SLERP,
  ``e = sin((1 - t) W) / sin(W) * x_l / ||x_l|| + sin(t W) / sin(W) * x_l+1 / ||x_l+1||``,
  ``W = arccos(cos(x_l, x_l+1))`` (``t = 0`` is layer ``l``'s direction, ``t = 1`` layer ``l+1``'s);
* restore: layer ``i`` of the pair reads ``e * ||x_i||``;
* token retention: the angular distance ``d = W / pi`` of each token; tokens with
  ``d >= d_min + (d_max - d_min) * gamma`` are stored unmerged for both layers and put back in place on restore.

Parameters: ``start_layer`` (paper: merge from the middle of the depth, ``S = L / 2``; None = ``num_layers // 2``;
pairs are consecutive managed layers from there: ``(S, S+1), (S+2, S+3), ...``, an odd last layer stays unmerged; a
value >= the number of layers merges nothing), ``t`` (SLERP interpolation, 0.6 as in the paper), ``gamma`` (retention
threshold in [0, 1]; 0.05 here; 0 retains every token = merging off, 1 retains only the most distant token of each
head), ``merge_every`` (decoded tokens merged in batches of this many, see below).

Choices of this implementation (the paper leaves them open or they follow from squeezekv's cache):

* granularity: directions, magnitudes and distances per (batch row, KV head, token), i.e. over ``head_dim``; the
  threshold's ``d_min``/``d_max`` are taken per (row, head) over that head's real (non-padding) tokens. Retained
  tokens are stored as a dense ``[B, H, r, D]`` list with their positions (``-1`` = unused slot when heads retain
  different counts; ``r`` is the largest count), counted in the bytes.
* when: the prompt is merged once its prefill is done, after eviction (``(evict, then merge)``); before that both
  layers hold their own KV like any layer. Decoded tokens go to a small unmerged per-layer tail; the tail is merged
  (with the prompt's thresholds) when the pair evicts (policies that keep evicting: every eviction) or when it reaches
  ``merge_every`` tokens. A multi-token forward after the prompt (e.g. a continuation scored in one pass) is merged
  at its end like a prompt chunk.
* eviction: both layers of a pair always hold the same tokens. The pair's first layer chooses (its policy scores,
  its budget from the plan) and the second layer never evicts by itself: it is handed the same indices. The plan
  gives both layers of a pair one budget (:meth:`MiniCache.tied_layers`: the mean of the allocation's two budgets,
  recorded as ``tied_layers`` in ``plan.details``; a given plan that does not is refused), so what each layer holds
  is what the plan says.
* attention: each step, a merged layer rebuilds its keys/values (direction * magnitude, retained tokens put back in
  place) followed by its tail, and attends over them: one transient full-size K/V tensor per layer per step (freed
  after the layer's attention), O(n * head_dim) extra work per layer per step.
* bytes: the pair's shared directions (and retained positions, thresholds) are attributed to its first layer.

Composes with every eviction policy and allocation; not with CUDA-graph decoding
(:class:`squeezekv.graphs.GraphDecoder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..cache import SqueezeLayer
from ..layer_storage import _allocated
from ..registry import register_crosslayer
from .base import CrossLayerMethod

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import SqueezeCache

_EPS = 1e-12  # norm floor (a zero vector gets direction 0 and magnitude 0: restored exactly)
_SIN_EPS = 1e-6  # below this sin(W) SLERP falls back to linear interpolation (nearly parallel vectors)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a, b)) / pi`` over the last dim, float32, in [0, 1]. ``[..., D] -> [...]``."""
    af, bf = a.float(), b.float()
    ua = af / af.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    ub = bf / bf.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return torch.arccos((ua * ub).sum(-1).clamp(-1.0, 1.0)) / math.pi


def slerp_direction(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP between the directions of ``a`` and ``b`` (``[..., D]``, float32 result): ``t = 0`` is ``a``'s."""
    af, bf = a.float(), b.float()
    ua = af / af.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    ub = bf / bf.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0))  # [..., 1]
    so = torch.sin(omega)
    small = so < _SIN_EPS
    safe = torch.where(small, torch.ones_like(so), so)
    wa = torch.where(small, torch.full_like(so, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    wb = torch.where(small, torch.full_like(so, t), torch.sin(t * omega) / safe)
    return wa * ua + wb * ub


def _compact(keep: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots to keep, used ones first: ``keep`` ``[B, H, s]`` bool, ``pos`` ``[B, H, s]`` positions. Returns the
    ``[B, H, r]`` slot order (r = most used slots of any head) and the positions there (-1 = unused)."""
    r = int(keep.sum(-1).max()) if keep.numel() else 0
    order = keep.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :r]  # [B, H, r]
    new_pos = torch.where(keep.gather(-1, order), pos.gather(-1, order), torch.full_like(order, -1))
    return order, new_pos.to(torch.int32)


@dataclass
class MergedStates:
    """Keys (or values) of a merged pair of layers, ``n`` tokens (``B`` rows, ``H`` KV heads, ``D`` head dim).

    ``direction`` ``[B, H, n, D]`` shared unit directions (the KV dtype); ``norms[i]`` ``[B, H, n]`` layer ``i``'s
    magnitudes; ``ret_pos`` ``[B, H, r]`` int32 position of each retained token (-1: unused slot);
    ``retained[i]`` ``[B, H, r, D]`` layer ``i``'s original vectors of those tokens; ``threshold`` ``[B, H]`` float32
    angular-distance threshold (from the prompt; reused for decoded tokens)."""

    direction: torch.Tensor
    norms: tuple[torch.Tensor, torch.Tensor]
    ret_pos: torch.Tensor
    retained: tuple[torch.Tensor, torch.Tensor]
    threshold: torch.Tensor

    @classmethod
    def merge(
        cls, a: torch.Tensor, b: torch.Tensor, t: float, gamma: float, valid: torch.Tensor | None = None,
        threshold: torch.Tensor | None = None,
    ) -> "MergedStates":
        """Merge layer vectors ``a``, ``b`` ``[B, H, n, D]``. ``valid`` ``[B, H, n]`` (False: padding, never
        retained nor used for the threshold); ``threshold`` ``[B, H]`` given (decoded tokens) or derived from
        ``gamma`` over these tokens (the prompt)."""
        d = angular_distance(a, b)  # [B, H, n]
        if threshold is None:
            if gamma == 0.0:
                threshold = d.new_zeros(d.shape[:2])  # every token retained: merging off
            else:
                real = torch.ones_like(d, dtype=torch.bool) if valid is None else valid
                d_min = d.masked_fill(~real, float("inf")).amin(-1)
                d_max = d.masked_fill(~real, float("-inf")).amax(-1)
                empty = ~real.any(-1)  # a row of padding only: nothing to retain
                threshold = torch.where(empty, torch.full_like(d_min, 2.0), d_min + (d_max - d_min) * gamma)
        keep = d >= threshold[..., None]
        if valid is not None:
            keep &= valid
        n = d.shape[-1]
        order, ret_pos = _compact(keep, torch.arange(n, device=d.device).expand_as(keep))
        dim = a.shape[-1]
        idx = order[..., None].expand(-1, -1, -1, dim)
        return cls(
            direction=slerp_direction(a, b, t).to(a.dtype),
            norms=(a.float().norm(dim=-1).to(a.dtype), b.float().norm(dim=-1).to(b.dtype)),
            ret_pos=ret_pos,
            retained=(a.gather(2, idx), b.gather(2, idx)),
            threshold=threshold.float(),
        )

    @property
    def length(self) -> int:
        return self.direction.shape[2]

    @property
    def retained_slots(self) -> int:
        return self.ret_pos.shape[-1]

    def retained_count(self) -> int:
        """Retained tokens summed over rows and heads (used slots)."""
        return int((self.ret_pos >= 0).sum())

    def reconstruct(self, which: int) -> torch.Tensor:
        """Layer ``which``'s vectors ``[B, H, n, D]``: direction * magnitude, retained tokens put back in place."""
        b, h, n, dim = self.direction.shape
        x = (self.direction.float() * self.norms[which].float()[..., None]).to(self.direction.dtype)
        full = torch.cat([x, x.new_zeros((b, h, 1, dim))], dim=2)  # slot n takes the unused retained slots
        pos = torch.where(self.ret_pos >= 0, self.ret_pos, n).long()
        full.scatter_(2, pos[..., None].expand(-1, -1, -1, dim), self.retained[which])
        return full[:, :, :n]

    def cat(self, other: "MergedStates") -> "MergedStates":
        """These tokens followed by ``other``'s (same thresholds)."""
        n = self.length
        pos = torch.cat([self.ret_pos, torch.where(other.ret_pos >= 0, other.ret_pos + n, other.ret_pos)], dim=-1)
        rets = [torch.cat([x, y], dim=2) for x, y in zip(self.retained, other.retained)]
        order, new_pos = _compact(pos >= 0, pos)
        idx = order[..., None].expand(-1, -1, -1, self.direction.shape[-1]).long()
        return MergedStates(
            direction=torch.cat([self.direction, other.direction], dim=2),
            norms=(torch.cat([self.norms[0], other.norms[0]], -1), torch.cat([self.norms[1], other.norms[1]], -1)),
            ret_pos=new_pos,
            retained=(rets[0].gather(2, idx), rets[1].gather(2, idx)),
            threshold=self.threshold,
        )

    def gather(self, idx: torch.Tensor) -> "MergedStates":
        """Keep positions ``idx`` ``[B, H, k]`` (ascending); retained tokens that were evicted are dropped."""
        b, h, n, dim = self.direction.shape
        k = idx.shape[-1]
        idx = idx.long()
        new_of_old = torch.full((b, h, n + 1), -1, dtype=torch.long, device=idx.device)
        new_of_old[..., :n].scatter_(2, idx, torch.arange(k, device=idx.device).expand(b, h, k))
        pos = new_of_old.gather(2, torch.where(self.ret_pos >= 0, self.ret_pos, n).long())  # [B, H, r]
        order, new_pos = _compact(pos >= 0, pos)
        ridx = order[..., None].expand(-1, -1, -1, dim).long()
        return MergedStates(
            direction=self.direction.gather(2, idx[..., None].expand(-1, -1, -1, dim)),
            norms=(self.norms[0].gather(2, idx), self.norms[1].gather(2, idx)),
            ret_pos=new_pos,
            retained=(self.retained[0].gather(2, ridx), self.retained[1].gather(2, ridx)),
            threshold=self.threshold,
        )

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "MergedStates":
        """Apply a batch operation (reorder, repeat, select rows) to every tensor."""
        return MergedStates(fn(self.direction), (fn(self.norms[0]), fn(self.norms[1])), fn(self.ret_pos),
                            (fn(self.retained[0]), fn(self.retained[1])), fn(self.threshold))

    def shared_kv_nbytes(self) -> int:
        return _allocated(self.direction)

    def layer_kv_nbytes(self, which: int) -> int:
        return _allocated(self.norms[which]) + _allocated(self.retained[which])

    def shared_bookkeeping_nbytes(self) -> int:
        return _allocated(self.ret_pos) + _allocated(self.threshold)


class MiniCachePair:
    """Two managed layers whose KV is merged; owns the merged storage and evicts both layers with one selection."""

    def __init__(self, method: "MiniCache", layer_ids: tuple[int, int]):
        self.method = method
        self.layer_ids = layer_ids
        self.layers: list[MiniCacheLayer] = []
        self.keys: MergedStates | None = None
        self.values: MergedStates | None = None

    @property
    def merged(self) -> bool:
        return self.keys is not None

    @property
    def merged_length(self) -> int:
        return 0 if self.keys is None else self.keys.length

    def budget(self, cache: "SqueezeCache") -> int:
        """The pair's budget: its first layer's in the plan (both layers always hold the same tokens)."""
        return cache.plan[self.layer_ids[0]]

    def step(self, cache: "SqueezeCache", decoding: bool) -> None:
        """After the second layer attended: evict and/or merge as the plan and the method say."""
        first = self.layers[0]
        budget = self.budget(cache)
        if not decoding:
            self.compress(budget)
        elif (decode_budget := first.decode_budget()) is not None and \
                first.physical_length >= decode_budget + cache.evict_every:
            self.compress(decode_budget)
        elif first.tail_length >= self.method.merge_every:
            self.merge_tail()

    def compress(self, budget: int) -> None:
        """Evict both layers to ``budget`` with the first layer's selection, then merge everything held."""
        first, second = self.layers
        for layer in self.layers:
            layer.end_view()
        evict = first.physical_length > budget and first.policy.evicts
        idx = first.policy.select(first, budget) if evict else None  # [B, H, k]
        if not self.merged:
            if idx is not None:
                first.keep(idx)
                second.keep(idx)
            m = self.method
            self.keys = MergedStates.merge(first.keys, second.keys, m.t, m.gamma, first.valid)
            self.values = MergedStates.merge(first.values, second.values, m.t, m.gamma, first.valid)
            for layer in self.layers:
                layer.clear_tail()
            return
        self.merge_tail()
        if idx is not None:
            self.keys = self.keys.gather(idx)
            self.values = self.values.gather(idx)
            first.keep(idx)
            second.keep(idx)

    def merge_tail(self) -> None:
        """Merge the decoded tokens both layers hold unmerged into the shared storage (the prompt's thresholds)."""
        first, second = self.layers
        if first.tail_length != second.tail_length:
            raise RuntimeError(
                f"minicache pair {self.layer_ids}: layers hold {first.tail_length} and {second.tail_length} "
                "unmerged tokens; both layers must see the same tokens"
            )
        if first.tail_length == 0:
            return
        n, m = self.merged_length, self.method
        valid = None if first.valid is None else first.valid[..., n:]
        new_k = MergedStates.merge(first.keys, second.keys, m.t, m.gamma, valid, threshold=self.keys.threshold)
        new_v = MergedStates.merge(first.values, second.values, m.t, m.gamma, valid, threshold=self.values.threshold)
        self.keys = self.keys.cat(new_k)
        self.values = self.values.cat(new_v)
        for layer in self.layers:
            layer.clear_tail()

    def reset(self) -> None:
        self.keys = self.values = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.merged:
            self.keys = self.keys.map(fn)
            self.values = self.values.map(fn)


class MiniCacheLayer(SqueezeLayer):
    """One layer of a MiniCache pair (``which`` = 0 first, 1 second).

    Before the pair is merged it holds its own keys/values like a :class:`SqueezeLayer`. After: ``keys``/``values``
    hold only the unmerged tail (decoded tokens), the merged part lives in :attr:`pair`; ``token_idx``/``scores``/
    ``valid`` cover merged part + tail. Between ``update`` and ``after_attention`` ``keys``/``values`` are the
    rebuilt full view (so policies and attention see every held token); the view is dropped afterwards."""

    supports_static = False  # the merged part lives in the pair's storage, outside the static slots
    supports_fill = False  # given keys/values would skip the pair's merge

    def __init__(self, cache: "SqueezeCache", layer_idx: int, pair: MiniCachePair, which: int):
        super().__init__(cache, layer_idx)
        self.pair = pair
        self.which = which
        self._tail: tuple[torch.Tensor, torch.Tensor] | None = None  # the tail while keys/values are the view

    # -- storage -------------------------------------------------------------------------------------------------
    @property
    def tail_length(self) -> int:
        tail = self._tail[0] if self._tail is not None else self.keys
        return 0 if tail is None or not self.pair.merged else tail.shape[-2]

    @property
    def physical_length(self) -> int:
        if not self.pair.merged:
            return super().physical_length
        return self.pair.merged_length + self.tail_length

    def end_view(self) -> None:
        """Drop the rebuilt full keys/values of the current forward; keys/values are the tail again."""
        if self._tail is not None:
            self.keys, self.values = self._tail
            self._tail = None

    def clear_tail(self) -> None:
        """Free the unmerged keys/values (they were merged into the pair)."""
        self.end_view()
        b, h, _, d = self.keys.shape
        self.keys = self.keys.new_empty((b, h, 0, d))
        self.values = self.values.new_empty((b, h, 0, self.values.shape[-1]))
        self._buffers.pop("keys", None)
        self._buffers.pop("values", None)

    def kv_nbytes(self) -> int:
        total = super().kv_nbytes()
        if self.pair.merged:
            for st in (self.pair.keys, self.pair.values):
                total += st.layer_kv_nbytes(self.which) + (st.shared_kv_nbytes() if self.which == 0 else 0)
        return total

    def nbytes(self) -> int:
        total = super().nbytes()
        if self.pair.merged:
            for st in (self.pair.keys, self.pair.values):
                total += st.layer_kv_nbytes(self.which)
                if self.which == 0:
                    total += st.shared_kv_nbytes() + st.shared_bookkeeping_nbytes()
        return total

    # -- transformers' layer protocol ----------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.pair.merged:
            return super().update(key_states, value_states, *args, **kwargs)
        self.end_view()
        tail_k, tail_v = super().update(key_states, value_states, *args, **kwargs)  # appended to the tail
        self._tail = (tail_k, tail_v)
        self.keys = torch.cat([self.pair.keys.reconstruct(self.which), tail_k], dim=2)  # [B, H, n + m, D]
        self.values = torch.cat([self.pair.values.reconstruct(self.which), tail_v], dim=2)
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._tail = None
        self.pair.reset()

    def _map(self, fn) -> None:
        self.end_view()
        super()._map(fn)
        if self.which == 0:
            self.pair.map(fn)

    # -- eviction ------------------------------------------------------------------------------------------------
    def keep(self, idx: torch.Tensor) -> None:
        if not self.pair.merged:
            super().keep(idx)
            return
        if self.tail_length:
            raise RuntimeError("minicache: merge the tail before evicting from a merged pair")
        self.token_idx = self.token_idx.gather(2, idx)
        if self.scores is not None:
            self.scores = self.scores.gather(2, idx)
        if self.valid is not None:
            self.valid = self.valid.gather(2, idx)
        self._buffers.pop("token_idx", None)
        self._buffers.pop("scores", None)
        self.compressed = True

    def compress(self, budget: int) -> None:
        """Called by the cache once the plan is known (SqueezeAttention): the pair compresses both layers when its
        second layer is called; the first layer never evicts by itself."""
        if self.which == 1:
            self.pair.compress(self.pair.budget(self.cache))

    def after_attention(self, q_len: int) -> None:
        self.end_view()
        budget = self.cache.budget_for(self.layer_idx, self.seen)
        if budget is None:
            return  # the plan waits for every layer's importance; the cache calls compress() then
        decoding = self.prefill_done and q_len == 1
        self.prefill_done = True
        if self.which == 1:
            self.pair.step(self.cache, decoding)


@register_crosslayer("minicache")
@dataclass
class MiniCache(CrossLayerMethod):
    paper = "Liu et al. 2024, arXiv 2405.14366"
    summary = "merge KV of adjacent deep layer pairs: shared SLERP direction, per-layer magnitudes, outlier tokens kept"
    start_layer: int | None = None
    t: float = 0.6
    gamma: float = 0.05
    merge_every: int = 64
    _pairs: dict[int, tuple[MiniCachePair, int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.start_layer is not None and (
            isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int) or self.start_layer < 0
        ):
            raise ValueError(f"minicache start_layer={self.start_layer!r} is out of range: an integer >= 0 or None")
        for name in ("t", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"minicache {name}={v!r} is out of range: must be a number in [0, 1]")
            setattr(self, name, float(v))
        if isinstance(self.merge_every, bool) or not isinstance(self.merge_every, int) or self.merge_every < 1:
            raise ValueError(f"minicache merge_every={self.merge_every!r} is out of range: an integer >= 1")

    def pairs(self, num_layers: int, managed: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
        """The merged pairs: consecutive managed layers from ``start_layer`` (default ``num_layers // 2``)."""
        start = num_layers // 2 if self.start_layer is None else self.start_layer
        eligible = [i for i in managed if i >= start]
        return [(eligible[k], eligible[k + 1]) for k in range(0, len(eligible) - 1, 2)]

    def make_layer(self, cache: "SqueezeCache", layer_idx: int) -> SqueezeLayer | None:
        if not self._pairs:
            for ids in self.pairs(cache.num_layers, cache.managed):
                pair = MiniCachePair(self, ids)
                self._pairs[ids[0]] = (pair, 0)
                self._pairs[ids[1]] = (pair, 1)
        entry = self._pairs.get(layer_idx)
        if entry is None:
            return None
        pair, which = entry
        layer = MiniCacheLayer(cache, layer_idx, pair, which)
        pair.layers.append(layer)
        return layer

    def tied_layers(self) -> list[tuple[int, ...]]:
        """The merged pairs: both layers of a pair hold the same tokens (the first layer selects for both), so the
        budget plan gives each pair one budget (the mean of what the allocation gave its two layers) and what every
        layer holds is what the plan says."""
        return sorted({pair.layer_ids for pair, _ in self._pairs.values()})

    def describe(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.init)
        return f"{self.name}({params})"
