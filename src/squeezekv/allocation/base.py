"""Layer allocators turn one base budget into a budget per layer (a :class:`~squeezekv.plan.BudgetPlan`)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar, Sequence

from ..registry import Method


class Allocator(Method):
    """Base class of the layer-dimension allocations.

    ``needs_importance``: the allocator needs one importance score per layer measured on the prompt (SqueezeAttention);
    the cache then defers compression until the whole prompt went through every layer.
    """

    needs_importance: ClassVar[bool] = False

    @abstractmethod
    def allocate(
        self, base: int, num_layers: int, importance: Sequence[float] | None = None
    ) -> tuple[list[int], dict[str, Any]]:
        """Per-layer budgets summing to ``base * num_layers`` (each >= 1), and a dict of how they were derived."""


def largest_remainder(shares: Sequence[float], total: int, minimum: int = 1) -> list[int]:
    """Integers proportional to ``shares`` that sum exactly to ``total`` (Hamilton's method), each >= ``minimum``.

    Each layer gets the floor of its exact share, the leftover tokens go to the largest fractional parts; a layer below
    ``minimum`` is raised to it with tokens taken from the largest budgets."""
    n = len(shares)
    if total < minimum * n:
        raise ValueError(f"cannot give {n} layers at least {minimum} tokens each from a total of {total}")
    s = sum(shares)
    ideal = [total * x / s for x in shares]
    out = [int(v) for v in ideal]
    order = sorted(range(n), key=lambda i: (-(ideal[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    for i in range(n):
        while out[i] < minimum:
            donor = max(range(n), key=lambda j: (out[j], -j))
            out[donor] -= 1
            out[i] += 1
    return out
