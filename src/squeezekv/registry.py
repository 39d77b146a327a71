"""The one registry of methods. The CLI choices, the README table, the tests' parametrisation and the benchmark grid
all read :data:`POLICIES` and :data:`ALLOCATIONS`; a method registers itself once with a decorator."""

from __future__ import annotations

import dataclasses
from abc import ABC
from typing import Any, Callable, ClassVar, TypeVar

T = TypeVar("T")

class Method(ABC):
    """What every registered method class shares: its registry ``name`` (set by the decorator), ``paper`` and
    ``summary`` (the docs and the README table), and :meth:`describe`."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def describe(self) -> str:
        """``name(param=value, ...)`` with the instance's parameters."""
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{self.name}({params})"


#: name -> eviction policy class (sequence dimension)
POLICIES: dict[str, type] = {}
#: name -> allocator class (layer dimension)
ALLOCATIONS: dict[str, type] = {}
#: name -> channel method class (fewer channels or bits per token)
CHANNELS: dict[str, type] = {}
#: name -> training-free cross-layer method class (layers reuse another layer's attention or KV)
CROSSLAYER: dict[str, type] = {}


def _register(table: dict[str, type], kind: str) -> Callable[[str], Callable[[type[T]], type[T]]]:
    def decorator_factory(name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in table:
                raise ValueError(f"{kind} {name!r} is registered twice ({table[name].__name__} and {cls.__name__})")
            for attr in ("paper", "summary"):
                if not getattr(cls, attr, None):
                    raise TypeError(f"{kind} {cls.__name__} must define a class attribute {attr!r}")
            cls.name = name  # type: ignore[attr-defined]
            table[name] = cls
            return cls

        return decorator

    return decorator_factory


register_policy = _register(POLICIES, "policy")
register_allocation = _register(ALLOCATIONS, "allocation")
register_channel = _register(CHANNELS, "channel method")
register_crosslayer = _register(CROSSLAYER, "cross-layer method")


def _load() -> None:
    # Importing the packages runs the decorators.
    from . import allocation, channel, crosslayer, policies  # noqa: F401


def _lookup(table: dict[str, type], kind: str, name: str) -> type:
    _load()
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name]


def _params(cls: type) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def make_policy(name: str, **params: Any) -> Any:
    """Instantiate the eviction policy ``name`` with ``params`` (unknown names or parameters raise)."""
    cls = _lookup(POLICIES, "method", name)
    return _construct(cls, "method", name, params)


def make_allocation(name: str, **params: Any) -> Any:
    """Instantiate the layer allocator ``name`` with ``params``."""
    cls = _lookup(ALLOCATIONS, "allocation", name)
    return _construct(cls, "allocation", name, params)


def make_channel(name: str, **params: Any) -> Any:
    """Instantiate the channel method ``name`` with ``params``."""
    cls = _lookup(CHANNELS, "channel method", name)
    return _construct(cls, "channel method", name, params)


def make_crosslayer(name: str, **params: Any) -> Any:
    """Instantiate the cross-layer method ``name`` with ``params``."""
    cls = _lookup(CROSSLAYER, "cross-layer method", name)
    return _construct(cls, "cross-layer method", name, params)


def _construct(cls: type, kind: str, name: str, params: dict[str, Any]) -> Any:
    allowed = _params(cls)
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise ValueError(
            f"{kind} {name!r} has no parameter {', '.join(map(repr, bad))}; "
            f"its parameters are: {', '.join(allowed) or 'none'}"
        )
    return cls(**params)


def policy_names() -> list[str]:
    _load()
    return list(POLICIES)


def allocation_names() -> list[str]:
    _load()
    return list(ALLOCATIONS)


def channel_names() -> list[str]:
    _load()
    return list(CHANNELS)


def crosslayer_names() -> list[str]:
    _load()
    return list(CROSSLAYER)


def describe() -> list[dict[str, Any]]:
    """One row per registered method: kind, name, summary, paper and default parameters."""
    _load()
    rows = []
    tables = (
        ("eviction policy", POLICIES), ("layer allocation", ALLOCATIONS), ("cross-layer", CROSSLAYER),
        ("channel", CHANNELS),
    )
    for kind, table in tables:
        for name, cls in table.items():
            rows.append(
                {"kind": kind, "name": name, "summary": cls.summary, "paper": cls.paper, "params": _params(cls)}
            )
    return rows


def markdown_table() -> str:
    """The README's method table, generated from the registry."""
    lines = ["| kind | name | what it does | paper | parameters (defaults) |", "|---|---|---|---|---|"]
    for row in describe():
        params = ", ".join(f"`{k}={v}`" for k, v in row["params"].items()) or "—"
        lines.append(f"| {row['kind']} | `{row['name']}` | {row['summary']} | {row['paper']} | {params} |")
    return "\n".join(lines)
