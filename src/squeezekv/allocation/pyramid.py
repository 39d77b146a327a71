"""Pyramid allocation: budgets decrease linearly from the bottom layer to the top, same total.

Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069. As in its official code (Zefan-Cai/PyramidKV, ``pyramidkv_utils.py``): the top layer gets
``base / beta``, the bottom layer ``2 * base - base / beta``, layers in between on the straight line, ``beta`` = 20.
Rounded with the largest-remainder method so the total is exactly ``num_layers * base``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_allocation
from .base import Allocator, largest_remainder


@register_allocation("pyramid")
@dataclass
class PyramidAllocation(Allocator):
    paper = "Cai et al. 2024, arXiv 2406.02069"
    summary = "linear decrease from bottom to top layer (PyramidKV)"
    beta: float = 20.0

    def __post_init__(self) -> None:
        if not float(self.beta) >= 1.0:
            raise ValueError(f"pyramid beta={self.beta!r} is out of range: must be >= 1")

    def allocate(self, base, num_layers, importance=None):
        if num_layers == 1:
            return [base], {"beta": self.beta}
        top = base / self.beta
        bottom = 2 * base - top
        shares = [bottom - (bottom - top) * i / (num_layers - 1) for i in range(num_layers)]
        return largest_remainder(shares, base * num_layers), {"beta": self.beta}
