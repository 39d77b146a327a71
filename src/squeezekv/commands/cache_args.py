"""The cache arguments every command shares, read into one :class:`~squeezekv.spec.CacheSpec`.

``--cache SPEC`` gives the whole cache in the spec's text form (``"method=snapkv budget=0.3 channel=kivi
channel.bits=2"``); the flags (``--method``, ``--budget``, ``--allocation``, ``--channel``, ``--crosslayer``, their
``--*-param NAME=VALUE``, ``--evict-every``, ``--prefill-chunk``) set or override single fields of it. Imports
neither torch nor transformers (the command line's help stays fast).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

from ..registry import allocation_names, channel_names, crosslayer_names, policy_names
from ..spec import CacheSpec, _split


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an argument's default, except ``None``/``False`` (an unset flag: its help says what applies)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``["window=32", "sinks=4"]`` -> ``{"window": 32, "sinks": 4}`` (values parsed as JSON when they can be)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"parameter {item!r} must look like name=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def add_cache_arguments(p: argparse.ArgumentParser, *, budget_help: str | None = None,
                        defaults_note: str = "") -> None:
    """Add ``--cache`` and the per-field flags to ``p`` (every default is None: the spec's defaults apply)."""
    d = CacheSpec()
    p.add_argument("--cache", default=None, metavar="SPEC",
                   help="the compressed cache in one string, e.g. \"method=snapkv budget=0.3 allocation=squeeze "
                   "method.window=32 channel=kivi channel.bits=2\"; the flags below override its fields"
                   + defaults_note)
    p.add_argument("--method", default=None, choices=policy_names(), help=f"eviction policy (default {d.method})")
    p.add_argument("--budget", default=None,
                   help=budget_help or f"per-layer KV budget: fraction of the prompt in (0, 1] or a token count >= 1 "
                   f"(default {d.budget})")
    p.add_argument("--allocation", default=None, choices=allocation_names(),
                   help=f"budget split across layers (default {d.allocation})")
    p.add_argument("--method-param", action="append", metavar="NAME=VALUE",
                   help="policy parameter, e.g. window=32 for snapkv (repeatable)")
    p.add_argument("--allocation-param", action="append", metavar="NAME=VALUE",
                   help="allocation parameter, e.g. p=0.3 for squeeze (repeatable)")
    p.add_argument("--channel", default=None,
                   help=f"channel method, fewer bits or channels per kept token: none, "
                   f"{', '.join(channel_names()) or '(none registered)'}")
    p.add_argument("--channel-param", action="append", metavar="NAME=VALUE",
                   help="a channel method's parameter, e.g. bits=2 for kivi (repeatable)")
    p.add_argument("--crosslayer", default=None,
                   help=f"training-free cross-layer method: none, {', '.join(crosslayer_names()) or '(none)'}")
    p.add_argument("--crosslayer-param", action="append", metavar="NAME=VALUE",
                   help="a cross-layer method's parameter (repeatable)")
    p.add_argument("--evict-every", type=int, default=None,
                   help="decoding steps between evictions, for policies that keep evicting (default 1)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prefill the prompt in chunks of this many tokens, compressing after each "
                   "(squeezekv.chunked_prefill; default: one pass)")


def given(args: argparse.Namespace) -> set[str]:
    """The spec fields the command line set: flags given, and keys written in ``--cache``."""
    out = {name for name in ("method", "budget", "allocation", "channel", "crosslayer", "evict_every",
                             "prefill_chunk") if getattr(args, name, None) is not None}
    out |= {f"{part}_params" for part in ("method", "allocation", "channel", "crosslayer")
            if getattr(args, f"{part}_param", None)}
    if getattr(args, "cache", None):
        for item in _split(args.cache):
            key = item.partition("=")[0]
            part, dot, _ = key.partition(".")
            out.add(f"{part}_params" if dot else key)
    return out


def cache_spec(args: argparse.Namespace, base: CacheSpec | None = None) -> CacheSpec:
    """The :class:`CacheSpec` of ``--cache`` (else ``base``, default the spec's defaults) with the flags applied;
    ``--channel none`` / ``--crosslayer none`` remove that method. Bad values raise ``ValueError`` naming them."""
    spec = CacheSpec.of(args.cache) if getattr(args, "cache", None) else (base or CacheSpec())
    changes: dict[str, Any] = {}
    for name in ("method", "budget", "allocation", "evict_every", "prefill_chunk"):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)  # a budget's text is read by Budget.parse ("1" = 1 token)
    for part in ("channel", "crosslayer"):
        value = getattr(args, part, None)
        if value is not None:
            changes[part] = None if value in ("", "none") else value
            if changes[part] is None:
                changes[f"{part}_params"] = {}
    for part in ("method", "allocation", "channel", "crosslayer"):
        extra = parse_params(getattr(args, f"{part}_param", None))
        if extra:
            changes[f"{part}_params"] = {**getattr(spec, f"{part}_params"), **extra}
    spec = spec.replace(**changes) if changes else spec
    for part in ("channel", "crosslayer"):
        if getattr(spec, f"{part}_params") and getattr(spec, part) is None:
            raise ValueError(f"--{part}-param given without a {part} method: add --{part} NAME")
    return spec
