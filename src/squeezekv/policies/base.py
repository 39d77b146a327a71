"""What every eviction policy shares: pick ``budget`` positions per (batch row, KV head) by a priority, keep them in
temporal order. A policy only says *how important* each cached position is (:meth:`EvictionPolicy.priority`)."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from ..registry import Method

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import SqueezeLayer

#: priority of a position that must be kept (sinks, recent window, observation window)
KEEP = float("inf")


class EvictionPolicy(Method):
    """Base class of the sequence-dimension policies.

    Class attributes: ``paper``/``summary`` (docs and README table), ``keeps_evicting`` (evict again during decoding,
    every ``evict_every`` steps, or only once after the prompt), ``uses_scores`` (the layer keeps a float32 score per
    cached position for this policy), ``evicts`` (False: never drop a token).
    """

    keeps_evicting: ClassVar[bool] = True
    evicts: ClassVar[bool] = True  # False only for the 'none' baseline: compress() keeps everything
    uses_scores: ClassVar[bool] = False

    def min_budget(self) -> int:
        """The smallest per-layer budget this policy can work with: 1 for every policy shipped here (a window or
        sink count larger than the budget shrinks to fit, see :meth:`fitted`)."""
        return 1

    def fitted(self, budget: int) -> dict[str, tuple[int, int]]:
        """The parameters this policy shrinks to fit ``budget`` tokens, as ``{name: (configured, used)}``; empty when
        it runs at ``budget`` as configured. :meth:`priority` applies them; the plan records them."""
        return {}

    @abstractmethod
    def priority(self, layer: "SqueezeLayer", budget: int) -> torch.Tensor:
        """Importance of each cached position, ``[batch, kv_heads, n]``; the ``budget`` highest are kept."""

    def wants_weights(self, layer: "SqueezeLayer", q_len: int) -> bool:
        """Whether the attention function must hand this policy the attention weights of the current queries."""
        return False

    def observe_weights(self, layer: "SqueezeLayer", weights: torch.Tensor, q_valid: torch.Tensor | None) -> None:
        """Receive softmaxed weights ``[batch, kv_heads, group, q_chunk, m]`` (float32) of a chunk of queries over
        the first ``m <= n`` held positions (the rest got no weight from these queries).

        ``q_valid`` is ``[batch, q_chunk]`` (False for padding queries) or None when every query is real."""

    def observe_queries(
        self, layer: "SqueezeLayer", query: torch.Tensor, allowed: torch.Tensor | None, scaling: float
    ) -> None:
        """Receive the current queries ``[batch, kv_heads, group, q, head_dim]`` after the layer was updated, with the
        boolean mask ``[batch, kv_heads, q, n]`` (None: plain causal, nothing evicted, no padding)."""

    # -- shared machinery -------------------------------------------------------------------------------------
    def select(self, layer: "SqueezeLayer", budget: int) -> torch.Tensor:
        """Indices ``[batch, kv_heads, k]`` (k = min(budget, n)) of the positions to keep, ascending (= temporal)."""
        n = layer.physical_length
        k = min(budget, n)
        prio = self.priority(layer, budget).float()
        valid = layer.valid
        if valid is not None:
            # padding never wins over a real token
            prio = prio.masked_fill(~valid, float("-inf"))
        window = getattr(layer, "sliding_window", None)  # views of other caches' layers (LCKV) have none
        if window:
            # no later query can see a token that left the sliding window: it never wins over one inside it
            prio = prio.masked_fill(layer.token_idx <= layer.seen - window, float("-inf"))
        idx = prio.topk(k, dim=-1, sorted=False).indices
        return idx.sort(dim=-1).values


def rank_from_start(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """0-based rank of every position among the real (non-padding) positions, counted from the oldest."""
    if valid is None:
        n = like.shape[-1]
        return torch.arange(n, device=like.device).expand(like.shape)
    return valid.long().cumsum(-1) - 1


def rank_from_end(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """0-based rank of every position among the real positions, counted from the newest (newest = 0)."""
    if valid is None:
        n = like.shape[-1]
        return (n - 1 - torch.arange(n, device=like.device)).expand(like.shape)
    v = valid.long()
    return v.sum(-1, keepdim=True) - v.cumsum(-1)
