"""Quality vs KV bytes of the channel methods (``benchmarks/results/channel/cpu_smollm2.json``).

    python benchmarks/plot_channel.py benchmarks/results/channel/cpu_smollm2.json --out docs/img/channel_quality_vs_bytes.png
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
    ap.add_argument("summary")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    data = json.loads(Path(args.summary).read_text())
    rows = data["summary"]
    panels = [(k, label) for k, label in (("ppl_all", "perplexity of the continuation (lower is better)"),
                                           ("needle_retrieval", "needle retrieval (fraction)"))
              if any(k in r for r in rows.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for cell, r in rows.items():
            if key not in r or "kv_bytes_vs_full" not in r:
                continue
            x = r["kv_bytes_vs_full"]
            marker = "s" if cell == "full" else ("^" if "snapkv" in cell or "h2o" in cell else "o")
            ax.scatter([x], [r[key]], marker=marker)
            ax.annotate(cell, (x, r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel="KV bytes after the prompt / full cache's (float32 run)", ylabel=label)
        ax.grid(alpha=0.3)
    needles = sorted({v.get("needle_n") for v in rows.values() if v.get("needle_n")})
    fig.suptitle(f"SmolLM2-135M-Instruct, CPU: channel methods alone and with eviction (needles per cell: "
                 f"{'-'.join(map(str, needles))}; perplexity: 2 documents)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
