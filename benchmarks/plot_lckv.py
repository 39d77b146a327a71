"""Training-loss curves of the LCKV reproduction (``benchmarks/results/lckv/log_*.jsonl``).

    python benchmarks/plot_lckv.py benchmarks/results/lckv --out docs/img/lckv_loss.png
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
    ap.add_argument("folder")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("standard", "lckv"):
        lines = (Path(args.folder) / f"log_{name}.jsonl").read_text().splitlines()
        rows = [r for r in map(json.loads, lines) if "step" in r]  # the last line is a summary
        ax.plot([r["tokens"] / 1e6 for r in rows], [r["loss"] for r in rows], label=name, linewidth=1)
    ax.set(xlabel="training tokens (millions)", ylabel="training loss", ylim=(None, 8),
           title="LCKV reproduction: same tokens, same steps (H200)")
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
