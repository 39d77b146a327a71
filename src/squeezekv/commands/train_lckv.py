"""``squeezekv train-lckv``: train an LCKV model (Wu & Tu, ACL 2024, arXiv 2405.10637) or a standard baseline from a
JSON config file and/or flags (flags override the file; every :class:`~.train.TrainConfig` field is a flag)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any

from ..lckv_config import TrainConfig


def _flag_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return {int: int, float: float, str: str}.get(base, str)


def add_arguments(parser: Any) -> None:
    """The ``squeezekv train-lckv`` arguments, added to its (sub-command) parser ``parser``."""
    parser.description = (
        "Tokenises the text sources into shards (once), then trains with the paper's parallel "
        "procedure (m iterations without gradient, b with gradient), with checkpoints, resumption from "
        "OUT_DIR/checkpoint, a progress bar with tokens/s and loss, and held-out perplexity at the end. "
        "bf16 autocast on CUDA."
    )
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--config", default=None, help="JSON file of training options (the flags' names)")
    parser.add_argument("--prepare-only", action="store_true", help="only tokenise the sources into shards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "sources":
            parser.add_argument(flag, nargs="+", default=None,
                                help="text sources: essays, linux-doc, or files/folders (default: essays)")
            continue
        parser.add_argument(flag, dest=f.name, type=_flag_type(hints[f.name]), default=None,
                            help=f"(default: {f.default if f.default is not dataclasses.MISSING else 'see code'})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if args.config:
        return TrainConfig.from_json(args.config, **overrides)
    return TrainConfig(**{k: v for k, v in overrides.items() if v is not None})


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    cfg.validate()
    if args.prepare_only:
        from ..crosslayer.lckv.data import prepare_shards

        info = prepare_shards(cfg.data_dir, cfg.sources, cfg.tokenizer, max_chars=cfg.max_chars,
                              progress=not args.no_progress)
        print(json.dumps({"data_dir": str(info.path), "train_tokens": info.train_tokens,
                          "val_tokens": info.val_tokens, "vocab_size": info.vocab_size}, indent=2))
        return 0
    from ..crosslayer.lckv.train import train

    summary = train(cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="squeezekv train-lckv")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
