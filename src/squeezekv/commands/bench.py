"""``squeezekv bench``: the GPU benchmark (:mod:`squeezekv.bench`) from a config file -- arguments and the
handler."""

from __future__ import annotations

import argparse


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.description = ("Measures, on a CUDA GPU and a randomly initialised model of a real size (weights do not "
                      "matter for speed), prefill time and peak memory, decode tokens/s at several batch sizes and "
                      "the largest batch that fits, for the full cache and each cache of the config (decode through "
                      "the decode runtime where it runs the cache, next to the eager path's row); writes a JSON "
                      "report with the config (benchmarks/run.py runs the same measurements as suites).")
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="", help="comma-separated parts: prefill,decode,maxbatch")
    ap.add_argument("--caches", default="", help="semicolon-separated caches overriding the config's: 'full' or a "
                    "cache spec, e.g. 'full; method=window evict_every=16; method=snapkv'")
    ap.add_argument("--batches", default="", help="comma-separated decode batch sizes, overriding the config's")
    ap.add_argument("--prefill-contexts", default="", help="comma-separated prefill contexts, overriding the config's")
    ap.add_argument("--prefill-chunks", default="",
                    help="comma-separated chunk sizes: each compressed method's prefill is also measured in chunks "
                    "(squeezekv.chunked_prefill), compressing after each")
    ap.add_argument("--decode-steps", type=int, default=0,
                    help="timed decode steps per repetition, overriding the config's")
    ap.add_argument("--no-runtime", action="store_true",
                    help="decode every cache on the eager path (by default a cache the decode runtime can run -- "
                    "window, streamingllm, h2o, snapkv without a channel or cross-layer method -- decodes through "
                    "squeezekv.runtime's DecodeRuntime, rows with \"decoder\": \"runtime\")")
    ap.add_argument("--no-eager-reference", action="store_true",
                    help="leave out the eager path's reference row (method '<cache> decoder=eager') next to each "
                    "runtime row")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a check of the decode part (--only decode) with a small model config")


def main(args: argparse.Namespace) -> int:
    from ..bench import run

    run(args)
    return 0
