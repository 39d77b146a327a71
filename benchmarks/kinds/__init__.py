"""Case kinds of the benchmark runner: what a case measures. Each kind is registered with its fields (defaults, or
:data:`~benchmarks.suite.REQUIRED`), a validator and a ``run(ctx, case) -> list of result rows``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..suite import REQUIRED, Case  # noqa: F401 - REQUIRED is re-exported for the kind modules


@dataclass(frozen=True)
class Kind:
    name: str
    fields: dict[str, Any]
    run: Callable[[Any, Case], list[dict[str, Any]]]
    check: Callable[[dict[str, Any], str], None] | None = None
    #: the kind needs the suite's model (built once per suite run)
    needs_model: bool = True
    doc: str = field(default="")

    def validate(self, settings: dict[str, Any], where: str) -> None:
        for key in ("batches", "contexts", "chunks", "histories"):
            v = settings.get(key)
            if v is not None and key in self.fields and (
                    not isinstance(v, list) or not all(isinstance(x, int) and x >= 0 for x in v)):
                raise ValueError(f"{where}: {key}={v!r} must be a list of integers >= 0")
        if self.check is not None:
            self.check(settings, where)


KINDS: dict[str, Kind] = {}


Run = Callable[..., list[dict[str, Any]]]


def kind(name: str, fields: dict[str, Any], check: Callable[[dict[str, Any], str], None] | None = None,
         needs_model: bool = True) -> Callable[[Run], Run]:
    """Register ``run`` as the case kind ``name``."""
    def deco(run: Callable[..., list[dict[str, Any]]]) -> Callable[..., list[dict[str, Any]]]:
        KINDS[name] = Kind(name, dict(fields), run, check, needs_model, (run.__doc__ or "").strip())
        return run
    return deco


from . import decode, eval_grid, kernels, lckv, quality, runtime, serving, static  # noqa: E402,F401 - registers the kinds
