"""Plots of ``minicache_cpu.py``'s JSON: adjacent-layer K/V angular distance, and quality vs KV bytes.

    python benchmarks/plot_minicache.py benchmarks/results/crosslayer/minicache_cpu*.json --out docs/img
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="JSON files of one setup (adjacent distances from the first)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [json.loads(Path(f).read_text()) for f in args.files]
    data = runs[0]

    sim = data["adjacent_layer_distance"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = [r["layers"][0] for r in sim]
    for name, color in (("keys", "tab:blue"), ("values", "tab:orange")):
        ax.plot(x, [r[name]["median"] for r in sim], color=color, marker="o", ms=3, label=f"{name} (median)")
        ax.fill_between(x, [r[name]["q05"] for r in sim], [r[name]["q95"] for r in sim], color=color, alpha=0.2,
                        label=f"{name} (5-95%)")
    ax.axhline(0.5, color="gray", ls="--", lw=0.8)
    ax.text(0.5, 0.505, "orthogonal (cos = 0)", color="gray", fontsize=8)
    ax.set_xlabel("layer l (distance between layer l and l + 1)")
    ax.set_ylabel("angular distance arccos(cos) / pi")
    ax.set_ylim(0, 1)
    ax.set_title("SmolLM2-135M: K/V of adjacent layers, per KV head and token")
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(out / "minicache_adjacent_distance.png", dpi=120)
    plt.close(fig)

    rows = [r["summary"] for run in runs for r in run["results"]]
    full = next(r for r in rows if r["config"] == "full")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        evict = r["budget"] < 1.0
        marker = "s" if evict else ("o" if r["minicache"] else "*")
        color = "tab:red" if evict else ("tab:blue" if r["minicache"] else "black")
        label = r["config"]
        for ax, key in ((axes[0], "ppl"), (axes[1], "needle_retrieval")):
            ax.scatter(r["kv_fraction_of_full"], r[key], marker=marker, color=color, s=40)
            ax.annotate(label, (r["kv_fraction_of_full"], r[key]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    axes[0].axhline(full["ppl"], color="gray", ls="--", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("perplexity of the continuation (log scale)")
    axes[1].set_ylabel("needle retrieval")
    axes[1].set_ylim(-0.05, 1.05)
    for ax in axes:
        ax.set_xlabel("KV bytes after the prefill / full cache")
    fig.suptitle("MiniCache on SmolLM2-135M (CPU): mc_sS_gG = merge from layer S, retention gamma G; "
                 "snapkv0.3 = 30% eviction", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "minicache_quality_vs_bytes.png", dpi=120)
    plt.close(fig)

    depth = sorted([(0, full)] + [(r["merged_layers"], r) for r in rows if r["minicache"] and r["budget"] == 1.0
                                  and r["minicache"]["gamma"] == 1.0], key=lambda x: x[0])
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [d for d, _ in depth]
    ax.plot(xs, [r["ppl"] for _, r in depth], marker="o", color="tab:blue", label="perplexity")
    ax.set_xlabel("merged layers (gamma = 1: no retention; pairs from the top)")
    ax.set_ylabel("perplexity of the continuation", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["kv_fraction_of_full"] for _, r in depth], marker="s", color="tab:green", label="KV bytes")
    ax2.plot(xs, [r["needle_retrieval"] for _, r in depth], marker="^", color="tab:red", ls=":", label="needle")
    ax2.set_ylabel("KV bytes / full (green), needle retrieval (red)")
    ax2.set_ylim(0, 1.05)
    ax.set_title("MiniCache depth sweep on SmolLM2-135M (CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "minicache_depth.png", dpi=120)
    plt.close(fig)
    print(f"wrote minicache_adjacent_distance.png, minicache_quality_vs_bytes.png, minicache_depth.png in {out}")


if __name__ == "__main__":
    main()
