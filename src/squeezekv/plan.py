"""Budgets as data: what a user asks for (:class:`Budget`) and what each layer gets (:class:`BudgetPlan`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class Budget:
    """A per-layer KV budget as the user gives it: a fraction of the prompt or an absolute token count.

    ``Budget.parse(0.2)`` keeps 20% of the prompt's tokens per layer on average; ``Budget.parse(256)`` keeps 256.
    Floats in (0, 1] are fractions, integers >= 1 are token counts. The fraction ``1.0`` keeps every token (the cache
    evicts nothing, prompt or decoded); ``1`` is one token.
    """

    value: float
    is_fraction: bool

    @classmethod
    def parse(cls, budget: "float | int | str | Budget") -> "Budget":
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, bool):
            raise TypeError(f"budget must be a number, got {budget!r}")
        if isinstance(budget, str):
            text = budget.strip()
            try:
                budget = int(text) if text.isdigit() else float(text)
            except ValueError:
                raise ValueError(
                    f"budget {budget!r} is not a number: give a fraction in (0, 1] or a token count >= 1"
                ) from None
        if isinstance(budget, int):
            if budget < 1:
                raise ValueError(
                    f"budget {budget} is out of range: give a fraction in (0, 1] or a token count >= 1"
                )
            return cls(float(budget), is_fraction=False)
        if isinstance(budget, float):
            if not math.isfinite(budget) or budget <= 0:
                raise ValueError(
                    f"budget {budget} is out of range: give a fraction in (0, 1] or a token count >= 1"
                )
            if budget > 1:
                if budget.is_integer():
                    return cls(budget, is_fraction=False)
                raise ValueError(
                    f"budget {budget} is out of range: a fraction must be in (0, 1], a token count a whole number >= 1"
                )
            return cls(budget, is_fraction=True)
        raise TypeError(f"budget must be a float fraction or an int token count, got {type(budget).__name__}")

    def tokens(self, prompt_length: int) -> int:
        """Per-layer base budget in tokens for a prompt of ``prompt_length`` tokens (at least 1)."""
        if self.is_fraction:
            return max(1, int(round(self.value * prompt_length)))
        return int(self.value)

    def __str__(self) -> str:
        return f"{self.value:g} of the prompt" if self.is_fraction else f"{int(self.value)} tokens"


@dataclass(frozen=True)
class BudgetPlan:
    """Token budget of every layer of one cache, frozen once derived.

    ``budgets[i]`` is the number of KV positions layer ``i`` keeps after compression (``None`` for a layer the plan
    does not manage, e.g. a sliding-window layer that is bounded by the model itself). ``total`` is the sum over managed
    layers; ``base`` the per-layer budget the allocation started from (so ``total == base * managed layers`` for every
    allocation shipped here); ``allocation`` names the allocator and ``details`` records how it decided (importance
    scores, groups, ...).
    """

    budgets: tuple[int | None, ...]
    base: int
    allocation: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, b in enumerate(self.budgets):
            if b is not None and (not isinstance(b, int) or b < 1):
                raise ValueError(f"layer {i} budget {b!r} is out of range: budgets must be integers >= 1")
        if self.base < 1:
            raise ValueError(f"base budget {self.base} is out of range: must be >= 1")

    @property
    def total(self) -> int:
        return sum(b for b in self.budgets if b is not None)

    @property
    def managed_layers(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.budgets) if b is not None)

    def __len__(self) -> int:
        return len(self.budgets)

    def __getitem__(self, layer_idx: int) -> int | None:
        return self.budgets[layer_idx]

    def as_dict(self) -> dict[str, Any]:
        return {
            "allocation": self.allocation,
            "base": self.base,
            "total": self.total,
            "budgets": list(self.budgets),
            "details": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.details.items()},
        }

    def summary(self) -> str:
        managed = [b for b in self.budgets if b is not None]
        if not managed:
            return f"{self.allocation}: no managed layers"
        return (
            f"{self.allocation}: base {self.base} tokens/layer, total {self.total} over {len(managed)} layers, "
            f"min {min(managed)}, max {max(managed)}"
        )


def spread_evenly(total: int, n: int) -> list[int]:
    """Split ``total`` into ``n`` integers that differ by at most one and sum to ``total`` (extras go first)."""
    if n <= 0:
        raise ValueError(f"cannot spread over {n} layers")
    q, r = divmod(total, n)
    return [q + (1 if i < r else 0) for i in range(n)]


def check_layer_budgets(budgets: Sequence[int | None], minimum: int, who: str) -> None:
    """Raise if any managed layer's budget is below ``minimum`` (the policy's own lower bound)."""
    for i, b in enumerate(budgets):
        if b is not None and b < minimum:
            raise ValueError(
                f"layer {i} gets a budget of {b} tokens, below the {minimum} that {who} needs; "
                f"raise the budget or lower the policy's window/sink parameters"
            )


def cap_budgets(budgets: Sequence[int], cap: int) -> tuple[list[int], int]:
    """Clip budgets at ``cap`` (no layer can hold more than the prompt) and hand the surplus, evenly, to the layers
    still below it, so the total is unchanged whenever ``len(budgets) * cap`` allows. Returns the new budgets and the
    number of tokens moved."""
    out = [min(b, cap) for b in budgets]
    moved = surplus = sum(budgets) - sum(out)
    while surplus > 0:
        room = [i for i, b in enumerate(out) if b < cap]
        if not room:
            break
        share = spread_evenly(surplus, len(room))
        for i, s in zip(room, share):
            give = min(s, cap - out[i])
            out[i] += give
            surplus -= give
    return out, moved


def tie_budgets(budgets: Sequence[int | None], groups: Sequence[Sequence[int]]) -> list[int | None]:
    """Give every layer of a group the group's mean budget (rounded, >= 1): layers that must keep the same tokens
    (e.g. a shared-attention span) get one budget; the total changes by less than the group's size."""
    out = list(budgets)
    for group in groups:
        own = [budgets[i] for i in group]
        managed = [b for b in own if b is not None]
        if len(managed) != len(own):
            raise ValueError(f"layers {list(group)} are tied but not all of them are managed (budgets {own})")
        tied = max(1, int(round(sum(managed) / len(managed))))
        for i in group:
            out[i] = tied
    return out
