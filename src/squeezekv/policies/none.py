"""No eviction: every token is kept. Use it to apply a channel or cross-layer method on its own
(``make_cache(model, method="none", channel="kivi")``); with no such method it equals the full cache.

Paper: none (the baseline). No parameters; the budget is ignored.
"""

from __future__ import annotations

import torch

from ..registry import register_policy
from .base import EvictionPolicy


@register_policy("none")
class NoEvictionPolicy(EvictionPolicy):
    paper = "— (baseline: keep every token)"
    summary = "keep every token (for a channel or cross-layer method alone)"
    keeps_evicting = False
    evicts = False

    def priority(self, layer, budget: int) -> torch.Tensor:
        return layer.token_idx.float()
