"""Plots of the GPU throughput results (``throughput.py`` and ``kvpress_decode.py`` JSON files of one run).

    python benchmarks/plot.py benchmarks/results/gpu/h200_*.json --out docs/img
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    decode, prefill, maxb, gpu = defaultdict(dict), defaultdict(dict), {}, ""
    for f in args.files:
        d = json.loads(Path(f).read_text())
        gpu = d.get("gpu", gpu)
        for r in d.get("decode", []):
            if not r.get("oom"):
                decode[r["method"]][r["batch"]] = r["tokens_per_s"]
        for r in d.get("results", []):  # kvpress
            if not r.get("oom"):
                decode[f"kvpress {r['press']}"][r["batch"]] = r["tokens_per_s"]
        for r in d.get("prefill", []):
            if not r.get("oom"):
                prefill[r["method"]][r["context"]] = r["peak_bytes_over_weights"] / 2**30
        maxb.update(d.get("max_batch", {}))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, pts in sorted(decode.items()):
        xs = sorted(pts)
        style = "--" if method.startswith("kvpress") else "-"
        ax.plot(xs, [pts[x] for x in xs], style, marker="o", label=method)
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s",
           title=f"Decode at 8k context, 20% budget ({gpu})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decode_tokens_per_s.png", dpi=120)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, pts in sorted(prefill.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=method)
    ax.set(xscale="log", xlabel="prompt tokens (batch 1)", ylabel="prefill peak GiB over weights",
           title=f"Prefill peak memory ({gpu})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "prefill_peak_memory.png", dpi=120)

    if maxb:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(maxb)
        ax.bar(names, [maxb[n] for n in names])
        for i, n in enumerate(names):
            ax.text(i, maxb[n], str(maxb[n]), ha="center", va="bottom")
        ax.set(ylabel="max batch at 8k context", title=f"Max batch that fits ({gpu})")
        fig.tight_layout()
        fig.savefig(out / "max_batch.png", dpi=120)
    print(f"wrote plots to {out}")


if __name__ == "__main__":
    main()
