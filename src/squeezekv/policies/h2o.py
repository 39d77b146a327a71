"""H2O, Heavy-Hitter Oracle: keep the tokens with the largest accumulated attention plus a recent window.

Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023, arXiv 2306.14048. The score of a cached token is the sum of the attention weights it received from every
query so far (the prompt's queries at prefill, then each decoded query), per KV head; with grouped-query attention the
weights of the query heads of a group are summed. Eviction keeps ``recent_ratio * budget`` most recent tokens and fills
the rest with the highest-scoring ones (the paper's 50/50 split of heavy hitters and recent tokens); the recent part
is rounded to the nearest integer, so a budget of 1 keeps the heaviest hitter.

The scores are computed inside squeezekv's attention function from the queries it already has (no
``output_attentions`` and no model-wide eager attention): see :meth:`H2OPolicy.observe_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_policy
from .base import KEEP, EvictionPolicy, rank_from_end


@register_policy("h2o")
@dataclass
class H2OPolicy(EvictionPolicy):
    paper = "Zhang et al. 2023, arXiv 2306.14048"
    summary = "heavy hitters by accumulated attention + recent window"
    uses_scores = True
    recent_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not (0.0 <= float(self.recent_ratio) < 1.0):
            raise ValueError(f"h2o recent_ratio={self.recent_ratio!r} is out of range: must be in [0, 1)")

    def recent(self, budget: int) -> int:
        return int(round(self.recent_ratio * budget))

    def wants_weights(self, layer, q_len: int) -> bool:
        return True  # every query's attention is accumulated

    def observe_weights(self, layer, weights: torch.Tensor, q_valid: torch.Tensor | None) -> None:
        # weights: [B, Hkv, G, q, m] float32 over the first m <= n held positions; padding queries add nothing
        if q_valid is not None:
            weights = weights * q_valid[:, None, None, :, None].to(weights.dtype)
        layer.scores[..., : weights.shape[-1]] += weights.sum(dim=(2, 3))  # [B, Hkv, m]

    def priority(self, layer, budget: int) -> torch.Tensor:
        is_recent = rank_from_end(layer.valid, layer.scores) < self.recent(budget)
        return layer.scores.masked_fill(is_recent, KEEP)
