"""Quality vs KV bytes of every cell of a channel-method eval grid (``squeezekv eval`` output folder), one panel per
task: needle retrieval, QA F1, perplexity, each against the cell's KV bytes after the prompt as a fraction of the
full cache's (both measured in the same run; from the folder's ``summary.csv``).

    python benchmarks/plot_channel_grid.py benchmarks/results/channel/eval_gpu_smollm2 \
        --out docs/img/channel_grid_quality_vs_bytes.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("needle", "retrieval", "needle retrieval % (higher is better)"),
          ("qa", "f1", "QA F1 (higher is better)"),
          ("ppl", "nll", "perplexity (lower is better)"))


def family(method: str) -> str:
    """Colour key: the channel method's label (``none+kivi2`` -> ``kivi2``; eviction alone -> ``no channel method``)."""
    parts = method.split("+")
    return parts[1] if len(parts) > 1 else ("full" if method == "full" else "no channel method")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    rows = list(csv.DictReader((args.folder / "summary.csv").open()))
    fams = sorted({family(r["method"]) for r in rows})
    colours = {f: plt.cm.tab10(i % 10) for i, f in enumerate(fams)}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6.2 * len(PANELS), 5.0))
    for ax, (task, metric, label) in zip(axes, PANELS):
        sel = [r for r in rows if r["task"] == task and r["subset"] == "all" and r["metric"] == metric]
        for r in sel:
            x, y = float(r["kv_bytes_ratio"]), float(r["value"])
            evicted = r["method"].startswith("snapkv")
            marker = "o" if not evicted else ("s" if r["allocation"] == "uniform" else "^")
            ax.scatter(x, y, color=colours[family(r["method"])], marker=marker, s=46,
                       edgecolors="black" if r["method"] == "full" else "none")
            ax.errorbar(x, y, yerr=[[y - float(r["ci_low"])], [float(r["ci_high"]) - y]],
                        color=colours[family(r["method"])], alpha=0.35, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("KV bytes after the prompt / full cache (log)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colours[f], marker="o", ls="", label=f) for f in fams]
    handles += [plt.Line2D([], [], color="grey", marker=m, ls="", label=t)
                for m, t in (("o", "no eviction"), ("s", "SnapKV 30%, uniform"), ("^", "SnapKV 30%, squeeze"))]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"channel methods x SnapKV 30% ({args.folder.name}; 95% bootstrap intervals)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
