"""Sliding window: keep only the most recent ``budget`` tokens of every layer.

Paper: the local-attention baseline of Longformer (Beltagy et al., arXiv 2004.05150) as used for KV caches in
StreamingLLM's comparison (arXiv 2309.17453, "window attention"). No parameters: the budget is the window.
"""

from __future__ import annotations

import torch

from ..registry import register_policy
from .base import EvictionPolicy


@register_policy("window")
class WindowPolicy(EvictionPolicy):
    paper = "Longformer local attention, arXiv 2004.05150"
    summary = "keep the most recent tokens"

    def priority(self, layer, budget: int) -> torch.Tensor:
        return layer.token_idx.float()  # newer token = larger index = kept first
