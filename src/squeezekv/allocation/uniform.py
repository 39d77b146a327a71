"""Uniform allocation: every layer keeps the base budget (what most eviction papers do)."""

from __future__ import annotations

from ..registry import register_allocation
from .base import Allocator


@register_allocation("uniform")
class UniformAllocation(Allocator):
    paper = "baseline (same budget in every layer)"
    summary = "same budget in every layer"

    def allocate(self, base, num_layers, importance=None):
        return [base] * num_layers, {}
