"""StreamingLLM: ``sinks`` attention-sink tokens (the first real tokens) plus a window of the most recent tokens.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024, arXiv 2309.17453.
Parameters: ``sinks`` = 4 (the paper's default); the recent window is ``budget - sinks``. A budget of ``sinks`` tokens
or fewer keeps ``budget - 1`` sinks and the newest token (recorded in the plan, see :meth:`EvictionPolicy.fitted`).
With left padding the sinks are the first *real* tokens of each row, never padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_policy
from .base import KEEP, EvictionPolicy, rank_from_start


@register_policy("streamingllm")
@dataclass
class StreamingLLMPolicy(EvictionPolicy):
    paper = "Xiao et al. 2023, arXiv 2309.17453"
    summary = "attention sinks (first tokens) + recent window"
    sinks: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"streamingllm sinks={self.sinks!r} is out of range: must be an integer >= 0")

    def sinks_at(self, budget: int) -> int:
        """Sinks kept at ``budget``: at least one recent token besides them."""
        return min(self.sinks, budget - 1)

    def fitted(self, budget: int) -> dict[str, tuple[int, int]]:
        used = self.sinks_at(budget)
        return {} if used == self.sinks else {"sinks": (self.sinks, used)}

    def priority(self, layer, budget: int) -> torch.Tensor:
        recency = layer.token_idx.float()
        is_sink = rank_from_start(layer.valid, recency) < self.sinks_at(budget)
        return recency.masked_fill(is_sink, KEEP)
