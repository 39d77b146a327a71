"""Command line ``squeezekv COMMAND``: the dispatcher. Each command lives in a module with ``add_arguments(parser)``
and ``main(args) -> int`` (:mod:`squeezekv.commands`: ``run`` the main job, ``eval`` the quality grid, ``serve`` the
OpenAI-compatible server, ``train-lckv``, ``calibrate-cq``, ``calibrate-eigen``, ``analyze-layers``, ``bench``). A
command's module is imported only when that command is chosen, so ``squeezekv --help`` imports neither torch nor
transformers."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable, Sequence

from .registry import markdown_table

#: command -> (module under squeezekv, function adding its arguments, function running it, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "run": ("commands.run", "add_arguments", "main",
            "compress a real long prompt on the default model; the full cache and a few budgets in one table"),
    "methods": ("", "", "", "list the registered eviction policies, allocations, channel and cross-layer methods"),
    "bench": ("commands.bench", "add_arguments", "main",
              "GPU benchmark: prefill/decode throughput, peak memory and max batch vs the full cache"),
    "serve": ("commands.serve", "add_arguments", "main",
              "OpenAI-compatible server reusing multi-turn KV across GPU/CPU/disk tiers"),
    "train-lckv": ("commands.train_lckv", "add_arguments", "main",
                   "train a Layer-Condensed KV cache model (LCKV) or a standard baseline on offline text"),
    "calibrate-eigen": ("commands.calibrate_eigen", "add_arguments", "main",
                        "Eigen Attention calibration: PCA bases of keys/values on calibration text, saved to a file"),
    "calibrate-cq": ("commands.calibrate_cq", "add_arguments", "main",
                     "Coupled Quantization calibration: k-means codebooks of keys/values on calibration text, saved "
                     "to a file"),
    "eval": ("commands.eval", "add_arguments", "main",
             "quality grid: needle, long-context QA, perplexity x method x allocation x budget, with a report"),
    "analyze-layers": ("commands.analyze_layers", "add_arguments", "main",
                       "measure how similar the layers' attention weights are and propose Shared Attention spans"),
}


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
        "(sequence), split the budget across layers (SqueezeAttention), fewer bits or channels per token, layers "
        "that share; measure what it costs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_LazyParser)
    for name, (module, add, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, populate=_adds(module, add) if module else None)
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
    module, _, handler, _ = COMMANDS[args.command]
    try:
        rc = getattr(importlib.import_module(f"{__package__}.{module}"), handler)(args)
    except (ValueError, TypeError, FileNotFoundError) as err:  # user errors: a message, no traceback
        print(f"squeezekv: error: {err}", file=sys.stderr)
        return 2
    return 0 if rc is None else int(rc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
