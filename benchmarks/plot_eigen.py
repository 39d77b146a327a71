"""Eigen Attention plots and the rank table of a calibration (CPU, seconds).

    PYTHONPATH=src python benchmarks/plot_eigen.py --calibration eigen_smollm2.pt \\
        --quality benchmarks/results/channel/eigen_quality.json \\
        --ranks-json benchmarks/results/channel/eigen_ranks.json --out docs/img

Writes ``eigen_ranks.png`` (rank per layer, keys before/after RoPE and values, at two thresholds),
``eigen_energy.png`` (explained energy vs rank, mean over layers and KV heads), ``eigen_quality.png`` (NLL and
needle retrieval vs KV bytes per token, from ``eigen_quality.py``) and the ranks/energy curves as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from squeezekv.channel.eigen_calibrate import rank_report  # noqa: E402

LABELS = {"key_pre": "keys before RoPE (rope='pre', the paper's)", "key_post": "keys+queries after RoPE (rope='post')",
          "value": "values"}
THRESHOLDS = (0.8, 0.9, 0.95, 0.98, 0.99, 0.995)


def ranks_and_energy(state: dict) -> dict:
    out = {"calibration": state["calibration"], "model": state["model"], "thresholds": {}, "mean_energy": {}}
    for t in THRESHOLDS:
        out["thresholds"][str(t)] = rank_report(state, t)
    for name in LABELS:
        lam = state[name]["eigenvalues"].double()
        frac = lam.cumsum(-1) / lam.sum(-1, keepdim=True)
        out["mean_energy"][name] = [round(float(x), 5) for x in frac.mean(dim=(0, 1))]
    return out


def plot_ranks(info: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, t in zip(axes, ("0.9", "0.95")):
        rep = info["thresholds"][t]
        for name, style in zip(LABELS, ("-o", "--s", ":^")):
            ax.plot(rep["ranks"][name], style, ms=3, label=LABELS[name])
        ax.set_title(f"energy threshold {t}")
        ax.set_xlabel("layer")
        ax.axhline(rep["head_dim"], color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"rank (max over KV heads; head_dim {info['model']['head_dim']})")
    axes[0].legend(fontsize=8)
    fig.suptitle("Eigen Attention ranks per layer, SmolLM2-135M-Instruct "
                 f"({info['calibration']['tokens']} calibration tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "eigen_ranks.png", dpi=120)
    plt.close(fig)


def plot_energy(info: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name in LABELS:
        curve = info["mean_energy"][name]
        ax.plot(range(1, len(curve) + 1), curve, label=LABELS[name])
    ax.set_xlabel("rank r")
    ax.set_ylabel("explained energy (mean over layers, heads)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "eigen_energy.png", dpi=120)
    plt.close(fig)


def plot_quality(summary: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for cell, row in summary.items():
        x = row["kv_bytes_vs_full"]
        marker = "*" if cell == "full" else ("s" if "snapkv" in cell else ("^" if "post" in cell else "o"))
        for ax, key in zip(axes, ("nll_essays", "nll_linux-doc")):
            if key in row:
                ax.scatter(x, row[key], marker=marker)
                note = cell.replace("eigen-", "").replace("snapkv/squeeze/0.3", "snap30")
                if "needle_retrieval" in row:
                    note += f" (needle {row['needle_retrieval']:.0%})"
                ax.annotate(note, (x, row[key]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    for ax, title in zip(axes, ("essays", "linux-doc")):
        ax.set_xlabel("KV bytes per prompt token / full cache")
        ax.set_ylabel("mean NLL of the continuation")
        ax.set_title(f"perplexity task, {title}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "eigen_quality.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--quality", default=None)
    ap.add_argument("--ranks-json", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = torch.load(args.calibration, map_location="cpu", weights_only=True)
    info = ranks_and_energy(state)
    Path(args.ranks_json).write_text(json.dumps(info, indent=1))
    plot_ranks(info, out)
    plot_energy(info, out)
    if args.quality and Path(args.quality).exists():
        report = json.loads(Path(args.quality).read_text())
        if "summary" in report:
            plot_quality(report["summary"], out)


if __name__ == "__main__":
    main()
