"""Plot benchmarks/results/crosslayer/quality_cpu.json: perplexity, needle retrieval and KV bytes vs the number of
shared layers, without and with eviction on top.

    PYTHONPATH=src python benchmarks/plot_crosslayer.py benchmarks/results/crosslayer/quality_cpu.json \
        docs/img/crosslayer_quality.png
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(configs: dict) -> dict[str, list[tuple[int, dict]]]:
    """{"no eviction": [(k, summary)], "snapkv0.3": [...]} sorted by k (full = 0 shared without eviction)."""
    out: dict[str, list[tuple[int, dict]]] = {}
    for name, rec in configs.items():
        k, evict = 0, "no eviction"
        for part in name.split("+"):
            if re.fullmatch(r"sa\d+", part):
                k = int(part[2:])
            elif part != "full":
                evict = part
        out.setdefault(evict, []).append((k, rec["summary"]))
    return {key: sorted(v, key=lambda t: t[0]) for key, v in out.items()}


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.loads(src.read_text())
    full_bytes = data["configs"]["full"]["summary"]["kv_bytes_ppl_mean"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, pts in series(data["configs"]).items():
        ks = [k for k, _ in pts]
        axes[0].plot(ks, [s["ppl"] for _, s in pts], "o-", label=label)
        axes[1].plot(ks, [s["needle_retrieval"] for _, s in pts], "o-", label=label)
        axes[2].plot(ks, [s["kv_bytes_ppl_mean"] / full_bytes for _, s in pts], "o-", label=label)
    for ax, title in zip(axes, ("perplexity (essays + linux-doc)", "needle retrieval (1000 tokens)",
                                "KV bytes after a 1024-token prefix / full cache")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("shared layers (of 30)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.suptitle("Shared Attention on SmolLM2-135M-Instruct (CPU); spans from analyze-layers' spans_by_count",
                 fontsize=10)
    fig.tight_layout()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
