"""Suite configs: loading, validation, and the one parser of a case's cache settings.

A suite is a JSON file under ``benchmarks/suites/``::

    {
      "description": "what it measures",
      "model": {"random": "llama8b", "dtype": "bfloat16"},      # or {"pretrained": null} (the default model)
      "device": "cuda",
      "defaults": {"context": 8192, "steps": 16},               # merged into every case (keys its kind takes)
      "cases": [
        {"name": "full", "kind": "decode", "cache": "full", "batches": [16, 64]},
        {"name": "snapkv", "kind": "decode", "cache": "method=snapkv budget=0.2 allocation=uniform", "baseline": "full"}
      ]
    }

``cache`` is a :class:`squeezekv.CacheSpec` in its text form (or its dict form), or ``"full"`` for transformers' own
``DynamicCache``; :func:`parse_cache` reads it with ``CacheSpec.of``, the parser every entry point uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SUITES_DIR = HERE / "suites"
MODELS_DIR = HERE / "models"

#: cache methods that are not squeezekv eviction policies: transformers' DynamicCache holding every token
BASELINE_METHODS = ("full",)
#: keys of a suite file
SUITE_KEYS = ("description", "model", "device", "defaults", "cases")
#: keys of a suite's ``model``
MODEL_KEYS = ("random", "pretrained", "dtype", "threads")


@dataclass(frozen=True)
class Case:
    """One named measurement of a suite: its kind and its settings (the suite's defaults merged in)."""

    name: str
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        return self.settings[key]


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    model: dict[str, Any]
    device: str
    cases: tuple[Case, ...]
    raw: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The suite as it ran: every case with its defaults filled in."""
        return {"name": self.name, "description": self.description, "model": self.model, "device": self.device,
                "cases": [{"name": c.name, "kind": c.kind, **c.settings} for c in self.cases]}


def parse_cache(spec: Any, where: str = "cache") -> dict[str, Any]:
    """A case's cache, normalised to :meth:`squeezekv.CacheSpec.to_dict`'s form (every field filled in).

    ``"full"`` (or ``{"method": "full"}``): transformers' ``DynamicCache`` -> ``{"method": "full"}``. Anything else is
    a :class:`squeezekv.CacheSpec` in its text form (``"method=snapkv budget=0.2 allocation=uniform"``) or its dict
    form, read by :meth:`CacheSpec.of` -- the one parser of a cache description -- and checked against the registry.
    A channel's ``calibration=random`` asks for random codebooks/bases of the model's shape (speed and memory do not
    depend on their values). Bad keys, names or values raise ``ValueError`` naming the case."""
    from squeezekv.spec import CacheSpec

    if spec == "full" or (isinstance(spec, dict) and spec.get("method") in BASELINE_METHODS):
        if isinstance(spec, dict) and set(spec) != {"method"}:
            raise ValueError(f"{where}: method 'full' (transformers' DynamicCache) takes no settings, got "
                             f"{sorted(set(spec) - {'method'})}")
        return {"method": "full"}
    if not isinstance(spec, (str, dict)):
        raise TypeError(f"{where} must be 'full' or a cache spec (text or dict), got {type(spec).__name__}: {spec!r}")
    try:
        parsed = CacheSpec.of(spec)
        calibration = parsed.channel_params.get("calibration")
        if calibration == "random":  # resolved when the model's shape is known (caches.random_calibration)
            parsed.replace(channel_params={k: v for k, v in parsed.channel_params.items() if k != "calibration"}) \
                .validate()
        else:
            parsed.validate()
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None
    return parsed.to_dict()


def budget_tokens(cache: dict[str, Any], context: int) -> int:
    """Tokens per layer a cache keeps of a ``context``-token prompt (the whole prompt for ``full``/``none``)."""
    if cache["method"] in BASELINE_METHODS or cache["method"] == "none":
        return context
    b = cache["budget"]
    return context if b == 1.0 else (int(b) if b > 1 else max(1, int(round(b * context))))


def model_config(name: Any) -> dict[str, Any]:
    """A random model's LlamaConfig dict: inline, or the name of a file under ``benchmarks/models/``."""
    if isinstance(name, dict):
        return dict(name)
    path = MODELS_DIR / f"{name}.json"
    if not isinstance(name, str) or not path.is_file():
        known = sorted(p.stem for p in MODELS_DIR.glob("*.json"))
        raise ValueError(f"model random={name!r}: no such model shape; choose from {known} or give a LlamaConfig dict")
    return json.loads(path.read_text())


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.json"))


def suite_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return path
    path = SUITES_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown suite {name!r}; the suites are: {suite_names()} (or give a path to a .json)")
    return path


def load_suite(name: str) -> Suite:
    """Read and validate the suite ``name`` (a file under ``benchmarks/suites/`` or a path to a JSON file)."""
    path = suite_path(name)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"suite {path}: not valid JSON: {err}") from err
    return parse_suite(raw, path.stem)


def parse_suite(raw: dict[str, Any], name: str) -> Suite:
    from .kinds import KINDS

    if not isinstance(raw, dict):
        raise TypeError(f"suite {name!r} must be a JSON object, got {type(raw).__name__}")
    bad = sorted(set(raw) - set(SUITE_KEYS))
    if bad:
        raise ValueError(f"suite {name!r}: unknown key(s) {bad}; allowed: {list(SUITE_KEYS)}")
    model = dict(raw.get("model") or {})
    bad = sorted(set(model) - set(MODEL_KEYS))
    if bad:
        raise ValueError(f"suite {name!r}: model has unknown key(s) {bad}; allowed: {list(MODEL_KEYS)}")
    if "random" in model and "pretrained" in model:
        raise ValueError(f"suite {name!r}: model takes 'random' (a shape) or 'pretrained', not both")
    if "random" in model:
        model_config(model["random"])
    defaults = dict(raw.get("defaults") or {})
    cases_raw = raw.get("cases")
    if not isinstance(cases_raw, list) or not cases_raw:
        raise ValueError(f"suite {name!r}: 'cases' must be a non-empty list")
    cases, seen = [], set()
    for i, c in enumerate(cases_raw):
        if not isinstance(c, dict):
            raise TypeError(f"suite {name!r}: case {i} must be an object, got {c!r}")
        cname, kind = c.get("name"), c.get("kind")
        if not isinstance(cname, str) or not cname:
            raise ValueError(f"suite {name!r}: case {i} has no 'name'")
        if cname in seen:
            raise ValueError(f"suite {name!r}: case name {cname!r} is used twice")
        seen.add(cname)
        if kind not in KINDS:
            raise ValueError(f"suite {name!r}, case {cname!r}: unknown case kind {kind!r}; choose from {sorted(KINDS)}")
        spec = KINDS[kind]
        given = {k: v for k, v in c.items() if k not in ("name", "kind")}
        bad = sorted(set(given) - set(spec.fields))
        if bad:
            raise ValueError(f"suite {name!r}, case {cname!r} ({kind}): unknown key(s) {bad}; "
                             f"{kind} takes {sorted(spec.fields)}")
        settings = {**spec.fields, **{k: v for k, v in defaults.items() if k in spec.fields}, **given}
        missing = sorted(k for k, v in settings.items() if v is REQUIRED)
        if missing:
            raise ValueError(f"suite {name!r}, case {cname!r} ({kind}): missing {missing}")
        if "cache" in spec.fields:
            settings["cache"] = parse_cache(settings["cache"], f"suite {name!r}, case {cname!r}: cache")
        spec.validate(settings, f"suite {name!r}, case {cname!r}")
        cases.append(Case(cname, kind, settings))
    for case in cases:
        base = case.settings.get("baseline")
        if base is not None and base not in seen:
            raise ValueError(f"suite {name!r}, case {case.name!r}: baseline {base!r} is not a case of the suite")
        for other in case.settings.get("compare") or []:
            if other not in seen or other == case.name:
                raise ValueError(f"suite {name!r}, case {case.name!r}: compare names {other!r}, which is not another "
                                 "case of the suite")
    return Suite(name, str(raw.get("description", "")), model, str(raw.get("device", "cuda")), tuple(cases), raw)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: a kind's field without a default
REQUIRED: Any = _Required()
