"""``squeezekv analyze-layers``: measure how similar the layers' attention weights are and propose Shared Attention
spans (:mod:`squeezekv.crosslayer.analyze`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def main(args: Any) -> int:
    """``squeezekv analyze-layers``: load the model, measure, write ``OUT/layer_similarity.json`` and ``.png``."""
    from ..assets import load_model
    from ..crosslayer.analyze import DEFAULT_CALIBRATION, analyze_layers, calibration_text, plot_heatmap

    text = calibration_text(args.calibration_file)
    model, tokenizer = load_model(args.model, device=args.device)
    counts = tuple(int(c) for c in str(args.counts).split(",") if c.strip())
    report = analyze_layers(model, tokenizer, text, tokens=args.tokens, samples=args.samples,
                            threshold=args.threshold, counts=counts, progress=not args.no_progress)
    report["calibration"]["file"] = str(args.calibration_file or DEFAULT_CALIBRATION)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_similarity.json").write_text(json.dumps(report, indent=1) + "\n")
    png = None
    if not args.no_plot:
        png = plot_heatmap(report, out / "layer_similarity.png")
    shared = sum(b - a for a, b in report["spans"])
    print(f"proposed spans at similarity >= {args.threshold}: {report['spans']} ({shared} shared layers)")
    print(f"wrote {out / 'layer_similarity.json'}" + (f" and {png}" if png else ""))
    print(f"use: --crosslayer shared_attention --crosslayer-param spans={out / 'layer_similarity.json'}")
    return 0


def add_arguments(p: Any) -> None:
    """The ``squeezekv analyze-layers`` arguments, added to its (sub-command) parser ``p``."""
    import argparse

    p.description = (
        "Runs the model with eager attention on calibration text (default: the GPL v3 text in "
        "/usr/share/common-licenses, which no eval task uses) and measures, for every pair of layers, the cosine "
        "similarity of their post-softmax attention maps (per head, averaged; the measure of Shared Attention, "
        "arXiv 2407.12866) and the Jensen-Shannon divergence of their attention distributions. Writes "
        "OUT/layer_similarity.json (matrices, proposed spans, spans for a given number of shared layers) and a "
        "heat map OUT/layer_similarity.png. A span [first, last] is proposed where every layer's similarity to "
        "'first' is >= --threshold; pass the JSON to the shared_attention method (spans=FILE)."
    )
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--model", default="default", help="local checkpoint folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="minimum similarity of a span's layers to its first layer, in (0, 1]")
    p.add_argument("--out", default="analyze-layers-out", help="output folder")
    p.add_argument("--tokens", type=int, default=512, help="tokens per calibration window (maps are T x T)")
    p.add_argument("--samples", type=int, default=4, help="calibration windows (consecutive, non-overlapping)")
    p.add_argument("--counts", default="2,4,8,12,16",
                   help="comma-separated numbers of shared layers to propose spans for (spans_by_count)")
    p.add_argument("--calibration-file", default=None, help="calibration text instead of the GPL v3 text")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
