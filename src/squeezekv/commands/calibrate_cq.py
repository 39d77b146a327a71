"""``squeezekv calibrate-cq``: learn Coupled Quantization codebooks on calibration text and save them
(:mod:`squeezekv.channel.coupled`); the file is what ``channel_params={"calibration": FILE}`` loads."""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(p: Any) -> None:
    """The ``squeezekv calibrate-cq`` arguments, added to its (sub-command) parser ``p``."""
    p.description = (
        "Runs the model (float32) over calibration text (Linux kernel documentation pages of 2,000 to "
        "19,999 characters, which the evaluation never reads; $SQUEEZEKV_LINUX_DOC points elsewhere), collects every "
        "layer's cached keys (after RoPE) and values, learns one codebook per (layer, KV head, channel group, K/V) "
        "by k-means and saves them to OUT. Use it with make_cache(..., channel='coupled', "
        "channel_params={'bits': B, 'calibration': OUT})."
    )
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--out", required=True, help="codebook file to write")
    p.add_argument("--model", default="default", help="local checkpoint folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--bits", type=int, default=1, help="bits per channel (1 or 2)")
    p.add_argument("--channels", type=int, default=0, help="channels coupled per code (0: 8 // bits)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    p.add_argument("--iters", type=int, default=25, help="Lloyd iterations at most")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the model runs in float32 either way)")


def main(args: Any) -> int:
    import time

    import torch

    from ..assets import load_model
    from ..channel.coupled import CoupledQuant, calibration_ids

    method = CoupledQuant(bits=args.bits, channels=args.channels)
    if not isinstance(args.tokens, int) or args.tokens < 1:
        raise ValueError(f"--tokens={args.tokens!r} is out of range: must be an integer >= 1")

    model, tokenizer = load_model(args.model, device=args.device, dtype=torch.float32)
    t0 = time.perf_counter()
    method.calibrate(model, calibration_ids(tokenizer, args.tokens), iters=args.iters)
    method.save(args.out)
    print(f"saved {args.out}: {len(method._books)} layers, {method.codebook_nbytes() / 2**20:.1f} MiB of codebooks, "
          f"{args.tokens} tokens, {time.perf_counter() - t0:.0f} s")
    return 0
