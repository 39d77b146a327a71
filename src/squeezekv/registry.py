"""The one registry of methods. The CLI choices, the README table, the tests' parametrisation and the benchmark grid
all read :data:`POLICIES` and :data:`ALLOCATIONS`; a method registers itself once with a decorator.

Listing the methods (:func:`policy_names`, :func:`describe`, :func:`markdown_table`, what ``squeezekv --help`` and
``squeezekv methods`` print) imports no method module, hence neither torch nor transformers: the registry reads each
module of :data:`METHOD_MODULES` as source text (its ``@register_*("name")`` classes, their ``paper``/``summary``
strings and literal field defaults). When a module is imported, its decorator checks that the class says the same.
Building a method (:func:`make_policy` and the others) imports the modules."""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
from abc import ABC
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

T = TypeVar("T")

#: The modules (relative to the ``squeezekv`` package) that register the built-in methods, in the README table's
#: order within each kind. A module that registers a method must be listed here.
METHOD_MODULES: tuple[str, ...] = (
    "policies.window", "policies.streamingllm", "policies.h2o", "policies.snapkv", "policies.none",
    "allocation.uniform", "allocation.pyramid", "allocation.squeeze",
    "crosslayer.minicache", "crosslayer.shared_attention",
    "channel.coupled", "channel.kivi", "channel.eigen",
)


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
_TABLES = {"policy": POLICIES, "allocation": ALLOCATIONS, "channel": CHANNELS, "crosslayer": CROSSLAYER}


def _register(key: str, kind: str) -> Callable[[str], Callable[[type[T]], type[T]]]:
    def decorator_factory(name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            table = _TABLES[key]
            if name in table:
                raise ValueError(f"{kind} {name!r} is registered twice ({table[name].__name__} and {cls.__name__})")
            for attr in ("paper", "summary"):
                if not getattr(cls, attr, None):
                    raise TypeError(f"{kind} {cls.__name__} must define a class attribute {attr!r}")
            _check_static(key, kind, name, cls)
            cls.name = name  # type: ignore[attr-defined]
            table[name] = cls
            return cls

        return decorator

    return decorator_factory


register_policy = _register("policy", "policy")
register_allocation = _register("allocation", "allocation")
register_channel = _register("channel", "channel method")
register_crosslayer = _register("crosslayer", "cross-layer method")


def _load() -> None:
    # Importing the modules runs the decorators (and imports torch).
    for module in METHOD_MODULES:
        importlib.import_module(f"{__package__}.{module}")


_DECORATORS = {"register_policy": "policy", "register_allocation": "allocation", "register_channel": "channel",
               "register_crosslayer": "crosslayer"}


def _literal(node: ast.expr, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise TypeError(f"{where} must be a literal (the registry lists methods from their source text)") from None


def _static_class(cls_node: ast.ClassDef, module: str) -> tuple[str, str, dict[str, Any]] | None:
    """``(registry name, kind, row)`` of a ``@register_*("name")`` class read from source, or None."""
    reg = None
    is_dataclass = False
    for dec in cls_node.decorator_list:
        if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Name) and dec.func.id in _DECORATORS:
            reg = (_literal(dec.args[0], f"{module}.{cls_node.name}'s registry name"), _DECORATORS[dec.func.id])
        target = dec.func if isinstance(dec, ast.Call) else dec
        is_dataclass |= isinstance(target, ast.Name) and target.id == "dataclass"
    if reg is None:
        return None
    row: dict[str, Any] = {"summary": "", "paper": "", "params": {}}
    for stmt in cls_node.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            field_name: str = stmt.targets[0].id
            value: ast.expr | None = stmt.value
            annotation: ast.expr | None = None
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            field_name, value, annotation = stmt.target.id, stmt.value, stmt.annotation
        else:
            continue
        where = f"{module}.{cls_node.name}.{field_name}"
        if field_name in ("paper", "summary") and value is not None:
            row[field_name] = _literal(value, where)
            continue
        if annotation is None or not is_dataclass or value is None:
            continue  # not a dataclass field, or a field without a default
        if "ClassVar" in ast.unparse(annotation):
            continue
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
            default = next((k.value for k in value.keywords if k.arg == "default"), None)
            if default is not None:
                row["params"][field_name] = _literal(default, where)
            continue
        row["params"][field_name] = _literal(value, where)
    return reg[0], reg[1], row


@functools.cache
def _static() -> dict[str, dict[str, dict[str, Any]]]:
    """kind -> name -> ``{"summary", "paper", "params", "module"}`` of the built-in methods, read from source."""
    out: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in _DECORATORS.values()}
    root = Path(__file__).parent
    for module in METHOD_MODULES:
        tree = ast.parse(root.joinpath(*module.split(".")).with_suffix(".py").read_text(encoding="utf-8"))
        for node in tree.body:
            found = _static_class(node, module) if isinstance(node, ast.ClassDef) else None
            if found is not None:
                name, kind, row = found
                out[kind][name] = {**row, "module": f"{__package__}.{module}"}
    return out


def _check_static(key: str, kind: str, name: str, cls: type) -> None:
    """A class registered by a module of :data:`METHOD_MODULES` must match what the registry read from its source."""
    module = cls.__module__
    if module.removeprefix(f"{__package__}.") not in METHOD_MODULES:
        return  # a method registered from elsewhere (a plugin, a test): listed once its module is imported
    row = _static()[key].get(name)
    if row is None or row["module"] != module:
        raise TypeError(f"{kind} {name!r} ({cls.__name__}) must be registered with a literal "
                        f"@register_*({name!r}) decorator at the top level of {module}")
    seen = {"summary": cls.summary, "paper": cls.paper, "params": _params(cls)}  # type: ignore[attr-defined]
    for key, value in seen.items():
        if row[key] != value:
            raise TypeError(f"{kind} {name!r}: the registry read {key}={row[key]!r} from {module}'s source, "
                            f"but the class has {value!r}; give it as a literal in the class body")


def _names(key: str) -> list[str]:
    """Built-in names in :data:`METHOD_MODULES` order, then any registered from elsewhere."""
    static = list(_static()[key])
    return static + [n for n in _TABLES[key] if n not in static]


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
    """The eviction policies' names (imports no method module)."""
    return _names("policy")


def allocation_names() -> list[str]:
    """The layer allocations' names (imports no method module)."""
    return _names("allocation")


def channel_names() -> list[str]:
    """The channel methods' names (imports no method module)."""
    return _names("channel")


def crosslayer_names() -> list[str]:
    """The cross-layer methods' names (imports no method module)."""
    return _names("crosslayer")


def describe() -> list[dict[str, Any]]:
    """One row per registered method: kind, name, summary, paper and default parameters (imports no method
    module: built-in methods are read from source, others from their already registered classes)."""
    rows = []
    tables = (
        ("eviction policy", "policy"), ("layer allocation", "allocation"), ("cross-layer", "crosslayer"),
        ("channel", "channel"),
    )
    for kind, key in tables:
        static, table = _static()[key], _TABLES[key]
        for name in _names(key):
            if name in static:
                row = static[name]
                summary, paper, params = row["summary"], row["paper"], dict(row["params"])
            else:
                cls: Any = table[name]
                summary, paper, params = cls.summary, cls.paper, _params(cls)
            rows.append({"kind": kind, "name": name, "summary": summary, "paper": paper, "params": params})
    return rows


def markdown_table() -> str:
    """The README's method table, generated from the registry."""
    lines = ["| kind | name | what it does | paper | parameters (defaults) |", "|---|---|---|---|---|"]
    for row in describe():
        params = ", ".join(f"`{k}={v}`" for k, v in row["params"].items()) or "—"
        lines.append(f"| {row['kind']} | `{row['name']}` | {row['summary']} | {row['paper']} | {params} |")
    return "\n".join(lines)
