"""``squeezekv calibrate-eigen``: PCA bases of keys/values on calibration text, saved to a file
(:mod:`squeezekv.channel.eigen_calibrate`); the file is what ``channel_params={"calibration": FILE}`` loads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def add_arguments(p: Any) -> None:
    """The ``squeezekv calibrate-eigen`` arguments, added to its (sub-command) parser ``p``."""
    import argparse

    p.description = (
        "Runs the model on calibration text (Linux kernel documentation pages that the evaluation never "
        "reads, or --text-file), accumulates per layer and KV head the Gram matrices of keys (before and after "
        "RoPE, with queries) and values, and saves their eigenbases to OUT (torch format). Use it with "
        "make_cache(..., channel='eigen', channel_params={'calibration': OUT, 'threshold': T})."
    )
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--model", default="default", help="local checkpoint folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="calibration file to write")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--threshold", type=float, default=0.9, help="energy threshold for the printed rank report")
    p.add_argument("--text-file", default=None, help="calibrate on this text instead of the kernel documentation")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: Any) -> int:
    import json

    from ..assets import load_model
    from ..channel.eigen_calibrate import calibrate, calibration_sequences, calibration_texts, rank_report, save

    if not 0.0 < args.threshold <= 1.0:
        raise ValueError(f"--threshold {args.threshold!r} is out of range: must be in (0, 1]")
    model, tokenizer = load_model(args.model, device=args.device)
    if args.text_file is not None:
        if not Path(args.text_file).is_file():
            raise FileNotFoundError(f"text file {args.text_file!r} does not exist")
        texts = [(args.text_file, Path(args.text_file).read_text(encoding="utf-8", errors="replace"))]
        source = f"file:{args.text_file}"
    else:
        texts = calibration_texts()
        source = "linux-doc-6.1 pages of 4000..19999 characters (the eval reads >= 20000)"
    seqs = calibration_sequences(tokenizer, texts, args.tokens, args.seq_len)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(s) for s in seqs), desc="calibrating", unit="tok")
    t0 = time.perf_counter()
    state = calibrate(model, seqs, progress=None if bar is None else bar.update, source=source)
    if bar is not None:
        bar.close()
    state["calibration"]["seconds"] = round(time.perf_counter() - t0, 2)
    save(state, args.out)
    rep = rank_report(state, args.threshold)
    print(json.dumps({"out": str(args.out), "calibration": state["calibration"], "report": rep}))
    return 0
