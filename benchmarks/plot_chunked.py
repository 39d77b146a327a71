"""Quality cost of chunked prefill (issue 5): the same eval-harness examples, methods and budget, prefilled in one pass
vs in chunks of 512 tokens (compressing after each). Reads two results folders of `squeezekv eval`; writes a bar
figure and a JSON of the paired differences.

    python benchmarks/plot_chunked.py benchmarks/results/eval_gpu_smollm2 \
        benchmarks/results/eval_gpu_smollm2_chunked512 docs/img/chunked_prefill_quality.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from squeezekv.eval.grid import read_records  # noqa: E402

METRICS = (("needle", "retrieval", "needle retrieval (%)"), ("qa", "f1", "QA F1 (%)"), ("ppl", "nll", "NLL per token"))


def main(one_dir: str, chunked_dir: str, png: str) -> None:
    one = {(r["cell"], r["example_id"]): r for r in read_records(Path(one_dir) / "results.jsonl")}
    chunked = [r for r in read_records(Path(chunked_dir) / "results.jsonl") if r["cell"] != "full"]
    cells = sorted({r["cell"] for r in chunked})
    out: dict = {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (task, metric, label) in zip(axes, METRICS):
        xs, a_vals, b_vals = [], [], []
        for cell in cells:
            pairs = [(one[(cell, r["example_id"])]["scores"][metric], r["scores"][metric])
                     for r in chunked if r["cell"] == cell and r["task"] == task and (cell, r["example_id"]) in one]
            full = [one[("full", r["example_id"])]["scores"][metric]
                    for r in chunked if r["cell"] == cell and r["task"] == task and ("full", r["example_id"]) in one]
            if not pairs:
                continue
            a = sum(p[0] for p in pairs) / len(pairs)
            b = sum(p[1] for p in pairs) / len(pairs)
            scale = 100.0 if metric in ("retrieval", "f1") else 1.0
            out[f"{task}/{metric}/{cell}"] = {"n": len(pairs), "one_pass": a * scale, "chunked_512": b * scale,
                                              "full": sum(full) / len(full) * scale}
            xs.append(cell.split("/")[0])
            a_vals.append(a * scale)
            b_vals.append(b * scale)
        pos = range(len(xs))
        ax.bar([p - 0.2 for p in pos], a_vals, width=0.4, label="one pass")
        ax.bar([p + 0.2 for p in pos], b_vals, width=0.4, label="chunks of 512")
        full_val = next(v["full"] for k, v in out.items() if k.startswith(f"{task}/{metric}/"))
        ax.axhline(full_val, color="k", ls="--", lw=1, label="full cache")
        ax.set_xticks(list(pos), xs)
        ax.set_title(f"{label}, budget 0.2 (uniform)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    Path(png).with_suffix(".json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
