"""SnapKV: the prompt's last ``window`` queries vote for the prefix positions to keep.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024, arXiv 2404.14469.
Parameters follow the official code (FasterDecoding/SnapKV, ``snapkv_utils.py``): observation ``window`` = 64,
``kernel_size`` = 5, average pooling. Scores: softmax attention of the last ``window`` queries over the prefix, summed
over those queries, averaged over the query heads of each KV group (GQA-aware), smoothed by 1-D average pooling; keep
the top ``budget - window`` prefix positions per KV head plus the whole observation window. Compression happens once,
after the prompt; decoded tokens are appended (the paper compresses the prompt only).

A budget below ``window`` keeps the newest ``max(1, budget // 2)`` tokens outright and fills the rest with the
top-voted older ones (all ``window`` queries still vote; the positions of the observation window that are not kept
outright compete by their raw votes). The plan records the shrunk window (:meth:`EvictionPolicy.fitted`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import register_policy
from .base import KEEP, EvictionPolicy, rank_from_end


@register_policy("snapkv")
@dataclass
class SnapKVPolicy(EvictionPolicy):
    paper = "Li et al. 2024, arXiv 2404.14469"
    summary = "observation-window attention, pooled, top-k per KV head"
    keeps_evicting = False
    uses_scores = True
    window: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"snapkv window={self.window!r} is out of range: must be an integer >= 1")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"snapkv kernel_size={self.kernel_size!r} is out of range: must be an odd integer >= 1")

    def window_at(self, budget: int) -> int:
        """Newest positions kept outright at ``budget``: the observation window, or half the budget below it."""
        return self.window if budget >= self.window else max(1, budget // 2)

    def fitted(self, budget: int) -> dict[str, tuple[int, int]]:
        used = self.window_at(budget)
        return {} if used == self.window else {"window": (self.window, used)}

    def observe_queries(self, layer, query: torch.Tensor, allowed: torch.Tensor | None, scaling: float) -> None:
        # query: [B, Hkv, G, q, D]; only a prompt (or prompt chunk) longer than one token votes
        q_len = query.shape[3]
        if q_len <= 1:
            return
        w = min(self.window, q_len)
        q_win = query[:, :, :, -w:, :].float()  # [B, Hkv, G, w, D]
        keys = layer.attention_keys().float()  # [B, Hkv, n, D]: the keys the attention used
        logits = torch.einsum("bhgqd,bhnd->bhgqn", q_win, keys) * scaling  # [B, Hkv, G, w, n]
        if allowed is not None:
            logits = logits.masked_fill(~allowed[:, :, None, -w:, :], float("-inf"))
        else:  # plain causal layout: query i of the window sees keys <= n - w + i
            n = keys.shape[2]
            qpos = torch.arange(n - w, n, device=keys.device)[:, None]
            logits = logits.masked_fill(torch.arange(n, device=keys.device)[None, :] > qpos, float("-inf"))
        attn = logits.softmax(dim=-1).nan_to_num(0.0)
        votes = attn.sum(dim=3).mean(dim=2)  # [B, Hkv, n]: summed over window queries, averaged over the group
        n = votes.shape[-1]
        prefix = n - w
        pooled = torch.zeros_like(votes)
        if prefix > 0:
            b, h = votes.shape[:2]
            pooled[..., :prefix] = F.avg_pool1d(
                votes[..., :prefix].reshape(b * h, 1, prefix),
                kernel_size=self.kernel_size,
                stride=1,
                padding=self.kernel_size // 2,
            ).reshape(b, h, prefix)
        # the observation window's own votes: they rank its positions when a small budget shrinks the kept window
        pooled[..., prefix:] = votes[..., prefix:]
        layer.scores.copy_(pooled)

    def priority(self, layer, budget: int) -> torch.Tensor:
        in_window = rank_from_end(layer.valid, layer.scores) < self.window_at(budget)
        return layer.scores.masked_fill(in_window, KEEP)
