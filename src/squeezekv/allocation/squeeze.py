"""SqueezeAttention: shift KV budget from layers whose attention changes the hidden state little to the others.

Paper: Wang & Gan, "SqueezeAttention: 2D Management of KV-Cache in LLM Inference via Layer-wise Optimal Budget",
ICLR 2025, arXiv 2404.04793. Official code: hetailang/SqueezeAttention, ``utils_hh/modify_llama_drop.py``
(``LlamaDecoderLayer_squeeze.forward`` measures, ``LlamaModel_squeeze.forward`` clusters and sets budgets).

Importance (measured by :mod:`squeezekv.attention` during the prefill): for every layer, the cosine similarity between
each prompt token's hidden state before the self-attention block and after the attention output is added to it,
averaged over the prompt's tokens. High similarity = the layer changed little = unimportant.

Grouping and budgets, as the official code: k-means with k = 3 over the per-layer scalars (here exact 1-D k-means, so
deterministic), clusters sorted by centre; the cluster with the highest centre ("class 3") gets ``p * base`` tokens per
layer, and the other two clusters share what that frees equally, ``(L * base - n3 * p * base) / (L - n3)``, so the
total stays ``L * base`` (the ICLR version's two groups). Where the official code truncates each layer's budget with
``int()`` (losing a few tokens of the total), squeezekv hands the remainder, one token each, to the most important
layers so the total is exactly constant. A layer whose budget exceeds the prompt keeps the whole prompt in both; the
official code leaves the excess unused, squeezekv's cache gives it to the other layers (``plan.cap_budgets``) so the
total stays that of uniform. The budget computation is checked against the official formula in
``tests/test_squeeze_official.py`` (comparison table in ``docs/results.md``).

``p`` default: the official code exposes the shrunk group's budget as an absolute fraction (``--KV_class3``) with no
default other than "no change"; its README recommends ``--ini_size 0.21 --KV_class3 0.08`` (Mistral, samsum) as the
setting that "can significantly improve score", i.e. ``p = 0.08 / 0.21 = 0.38``, used here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import spread_evenly
from ..registry import register_allocation
from .base import Allocator
from .kmeans1d import kmeans_1d


@register_allocation("squeeze")
@dataclass
class SqueezeAllocation(Allocator):
    paper = "Wang & Gan 2024, arXiv 2404.04793"
    summary = "SqueezeAttention: cosine-similarity layer importance, k-means, budget moved to important layers"
    needs_importance = True
    p: float = 0.38
    clusters: int = 3

    def __post_init__(self) -> None:
        if not (0.0 < float(self.p) <= 1.0):
            raise ValueError(f"squeeze p={self.p!r} is out of range: must be in (0, 1]")
        if not isinstance(self.clusters, int) or self.clusters < 2:
            raise ValueError(f"squeeze clusters={self.clusters!r} is out of range: must be an integer >= 2")

    def allocate(self, base, num_layers, importance=None):
        if importance is None or len(importance) != num_layers:
            raise ValueError(
                f"squeeze allocation needs one importance score per layer ({num_layers}), got "
                f"{None if importance is None else len(importance)}"
            )
        labels, centers = kmeans_1d(list(importance), self.clusters)
        top = len(centers) - 1  # highest similarity = least important
        shrunk = [i for i in range(num_layers) if labels[i] == top]
        details = {
            "importance": [round(float(v), 6) for v in importance],
            "cluster_of_layer": labels,
            "cluster_centers": [round(c, 6) for c in centers],
            "shrunk_layers": shrunk,
            "p": self.p,
        }
        if len(centers) < 2 or len(shrunk) == num_layers:
            details["note"] = "all layers in one cluster: uniform budgets"
            return [base] * num_layers, details
        small = max(1, int(self.p * base))
        others = [i for i in range(num_layers) if labels[i] != top]
        # remainder tokens go to the most important layers (lowest similarity) first
        others.sort(key=lambda i: (importance[i], i))
        shares = spread_evenly(base * num_layers - small * len(shrunk), len(others))
        budgets = [small] * num_layers
        for i, b in zip(others, shares):
            budgets[i] = b
        return budgets, details
