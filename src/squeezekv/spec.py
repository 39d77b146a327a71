"""One description of a compressed cache, used by every entry point (``make_cache``, the CLI, eval, bench, serve, saved
result configs).

A :class:`CacheSpec` names the eviction policy, the budget, the layer allocation, the optional channel and
cross-layer methods, their parameters, how often decoding evicts and the prefill chunk. It has one text form, parsed
by :meth:`CacheSpec.parse` and written by :meth:`CacheSpec.to_text`::

    method=snapkv budget=0.3 allocation=squeeze method.window=32 channel=kivi channel.bits=2

(items separated by spaces or commas; ``<part>.<name>=<value>`` sets a parameter of ``method``, ``allocation``,
``channel`` or ``crosslayer``; values are read as JSON when they can be, else kept as text), and one dictionary form
(:meth:`to_dict` / :meth:`from_dict`) for JSON configs. This module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

_PARTS = ("method", "allocation", "channel", "crosslayer")
_SCALARS = ("method", "budget", "allocation", "channel", "crosslayer", "evict_every", "prefill_chunk")


def _split(text: str) -> list[str]:
    """Items separated by whitespace or commas, except inside brackets or quotes (JSON values keep their commas)."""
    items: list[str] = []
    cur: list[str] = []
    depth, quote = 0, False
    for ch in text:
        if ch == '"':
            quote = not quote
        elif not quote and ch in "[{":
            depth += 1
        elif not quote and ch in "]}":
            depth -= 1
        if not quote and depth == 0 and (ch.isspace() or ch == ","):
            if cur:
                items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        items.append("".join(cur))
    return items


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _budget_value(budget: Any) -> float | int:
    """The budget as a number (validated): a fraction in (0, 1] or a whole token count >= 1."""
    from .plan import Budget

    b = Budget.parse(budget)
    return b.value if b.is_fraction else int(b.value)


@dataclass(frozen=True)
class CacheSpec:
    """What compressed cache to build (defaults: SnapKV, half the prompt, the SqueezeAttention allocation).

    ``method``: eviction policy name; ``budget``: fraction of the prompt in (0, 1] or tokens per layer >= 1 (on
    average over layers); ``allocation``: how the total is split across layers; ``channel``/``crosslayer``: a channel
    or cross-layer method or ``None``; ``*_params``: each part's parameters; ``evict_every``: decoding steps between
    evictions (policies that keep evicting); ``prefill_chunk``: prefill the prompt in chunks of this many tokens,
    compressing after each (``None``: one pass).
    """

    method: str = "snapkv"
    budget: float | int = 0.5
    allocation: str = "squeeze"
    channel: str | None = None
    crosslayer: str | None = None
    method_params: Mapping[str, Any] = field(default_factory=dict)
    allocation_params: Mapping[str, Any] = field(default_factory=dict)
    channel_params: Mapping[str, Any] = field(default_factory=dict)
    crosslayer_params: Mapping[str, Any] = field(default_factory=dict)
    evict_every: int = 1
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        for part in _PARTS:
            params = getattr(self, f"{part}_params")
            if not isinstance(params, Mapping):
                raise TypeError(f"{part}_params={params!r} must be a mapping of parameter names to values")
            object.__setattr__(self, f"{part}_params", dict(params))  # a private copy: the caller's dict may change
        for part in ("channel", "crosslayer"):
            if getattr(self, part) in ("", "none"):
                object.__setattr__(self, part, None)
        for part in ("channel", "crosslayer"):
            if getattr(self, f"{part}_params") and getattr(self, part) is None:
                raise ValueError(f"{part}_params {getattr(self, f'{part}_params')} given without a {part} method: "
                                 f"name one ({part}=NAME)")
        object.__setattr__(self, "budget", _budget_value(self.budget))
        if isinstance(self.evict_every, bool) or not isinstance(self.evict_every, int) or self.evict_every < 1:
            raise ValueError(f"evict_every={self.evict_every!r} is out of range: an integer >= 1")
        chunk = self.prefill_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"prefill_chunk={chunk!r} is out of range: an integer >= 1, or None for one pass")

    # -- the two serialised forms ------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "CacheSpec":
        """A spec from its text form (see the module docstring); unknown keys raise naming them."""
        if not isinstance(text, str):
            raise TypeError(f"a cache spec must be text, got {type(text).__name__}")
        items = _split(text)
        if not items:
            raise ValueError("an empty cache spec: give at least method=NAME")
        data: dict[str, Any] = {f"{p}_params": {} for p in _PARTS}
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"cache spec item {item!r} must look like name=value (e.g. budget=0.3)")
            part, dot, name = key.partition(".")
            if dot:
                if part not in _PARTS or not name:
                    raise ValueError(
                        f"cache spec item {item!r}: a parameter is <part>.<name>=value with part one of {_PARTS}")
                data[f"{part}_params"][name] = _value(raw)
            elif key in _SCALARS:
                data[key] = raw if key in ("method", "allocation", "channel", "crosslayer") else _value(raw)
            else:
                raise ValueError(f"cache spec key {key!r} is unknown: choose from {_SCALARS} or <part>.<name>")
        return cls(**data)

    def to_text(self) -> str:
        """The text form; ``CacheSpec.parse(s.to_text()) == s``."""
        out = [f"method={self.method}", f"budget={self.budget}", f"allocation={self.allocation}"]
        for part in ("channel", "crosslayer"):
            if getattr(self, part) is not None:
                out.append(f"{part}={getattr(self, part)}")
        if self.evict_every != 1:
            out.append(f"evict_every={self.evict_every}")
        if self.prefill_chunk is not None:
            out.append(f"prefill_chunk={self.prefill_chunk}")
        for part in _PARTS:
            for name, value in getattr(self, f"{part}_params").items():
                plain = isinstance(value, str) and _value(value) == value and _split(value) == [value]
                text = value if plain else json.dumps(value, separators=(",", ":"))
                out.append(f"{part}.{name}={text}")
        return " ".join(out)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary; ``CacheSpec.from_dict(s.to_dict()) == s``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CacheSpec":
        """A spec from :meth:`to_dict`'s form (missing keys take the defaults; unknown keys raise naming them)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"cache spec keys {unknown} are unknown: choose from {sorted(known)}")
        return cls(**dict(data))

    # -- use -----------------------------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "CacheSpec":
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def validate(self) -> "CacheSpec":
        """Check every name and parameter against the registry (builds each part once); returns ``self``."""
        from .registry import make_allocation, make_channel, make_crosslayer, make_policy

        make_policy(self.method, **self.method_params)
        make_allocation(self.allocation, **self.allocation_params)
        if self.channel is not None:
            make_channel(self.channel, **self.channel_params)
        if self.crosslayer is not None:
            make_crosslayer(self.crosslayer, **self.crosslayer_params)
        return self

    @classmethod
    def of(cls, spec: "CacheSpec | str | Mapping[str, Any] | None" = None, **changes: Any) -> "CacheSpec":
        """The one way every entry point reads a cache description: a :class:`CacheSpec` as it is, its text form
        (``"method=snapkv budget=0.3"``), a bare method name (``"snapkv"``), its dictionary form, or ``None`` (the
        defaults); then ``changes`` (fields given as ``None`` are left as they are) applied."""
        if spec is None:
            base = cls()
        elif isinstance(spec, CacheSpec):
            base = spec
        elif isinstance(spec, str):
            base = cls.parse(spec) if "=" in spec else cls(method=spec)
        elif isinstance(spec, Mapping):
            base = cls.from_dict(spec)
        else:
            raise TypeError(f"a cache spec is a CacheSpec, its text, a method name or a dict; "
                            f"got {type(spec).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"cache spec fields {unknown} are unknown: choose from {sorted(known)}")
        given = {k: v for k, v in changes.items() if v is not None}
        return base.replace(**given) if given else base

    def label(self) -> str:
        """A short name for tables: ``snapkv 0.3`` (+ ``/allocation``, ``+channel``, ``&crosslayer`` when set)."""
        text = f"{self.method} {self.budget}"
        if self.allocation != CacheSpec.allocation:
            text += f"/{self.allocation}"
        if self.channel is not None:
            text += f"+{self.channel}"
        if self.crosslayer is not None:
            text += f"&{self.crosslayer}"
        return text
