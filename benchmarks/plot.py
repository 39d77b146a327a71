"""Plots of suite result JSONs (``python benchmarks/run.py SUITE --out DIR`` writes ``DIR/SUITE.json``).

    python benchmarks/plot.py DIR/throughput.json [MORE.json ...] --out docs/img

Per suite, from the case kinds it holds: ``SUITE_decode.png`` (tokens/s vs batch, one line per decode/kvpress case),
``SUITE_max_batch.png`` (bars), ``SUITE_prefill.png`` (time and peak memory vs context), ``SUITE_quality.png``
(each quality cell's perplexity and needle retrieval against its KV bytes as a fraction of the full cache's).
The figures committed under docs/img before the runner existed stay as they are (their data: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _rows(report: dict[str, Any], kinds: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    return {name: [r for r in c["rows"] if not r.get("oom") and not r.get("skipped") and not r.get("error")]
            for name, c in report["cases"].items() if c["kind"] in kinds}


def plot_suite(report: dict[str, Any], out: Path) -> list[Path]:
    """The figures of one suite result; returns their paths."""
    name, written = report["suite"], []
    gpu = report["device"].get("gpu") or report["device"]["device"]
    decode = {k: v for k, v in _rows(report, ("decode", "kvpress_decode", "static_decode", "runtime_decode")).items()
              if v}
    if decode:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for case, rows in decode.items():
            rows = sorted(rows, key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=case)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s", title=f"{name} ({gpu})")
        ax.legend(fontsize=7)
        written.append(out / f"{name}_decode.png")
    mb = {k: v[0]["max_batch"] for k, v in _rows(report, ("max_batch", "runtime_max_batch")).items() if v}
    if mb:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.bar(list(mb), list(mb.values()))
        ax.set(ylabel="max batch", title=f"{name} ({gpu})")
        ax.tick_params(axis="x", rotation=30, labelsize=7)
        written.append(out / f"{name}_max_batch.png")
    prefill = {k: v for k, v in _rows(report, ("prefill",)).items() if v}
    if prefill:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for case, rows in prefill.items():
            for chunk in sorted({r["prefill_chunk"] for r in rows}):
                rs = sorted((r for r in rows if r["prefill_chunk"] == chunk), key=lambda r: r["context"])
                label = case + (f" chunk {chunk}" if chunk else "")
                axes[0].plot([r["context"] for r in rs], [r["prefill_s"] for r in rs], marker="o", label=label)
                if "peak_bytes_over_weights" in rs[0]:
                    axes[1].plot([r["context"] for r in rs], [r["peak_bytes_over_weights"] / 2**30 for r in rs],
                                 marker="o", label=label)
        axes[0].set(xscale="log", xlabel="context", ylabel="prefill seconds")
        axes[1].set(xscale="log", xlabel="context", ylabel="peak GiB over the weights")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{name} ({gpu})")
        written.append(out / f"{name}_prefill.png")
    quality = {k: v[0] for k, v in _rows(report, ("quality",)).items() if v}
    if quality:
        panels = [(key, label) for key, label in (("ppl_all", "perplexity (lower is better)"),
                                                  ("needle_retrieval", "needle retrieval (higher is better)"))
                  if any(key in r for r in quality.values())]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels):
            for case, r in quality.items():
                if key in r:
                    ax.scatter(r["kv_fraction_of_full"], r[key])
                    ax.annotate(case, (r["kv_fraction_of_full"], r[key]), fontsize=6)
            ax.set(xlabel="KV bytes / full cache's", ylabel=label)
        fig.suptitle(name)
        written.append(out / f"{name}_quality.png")
    figs = [plt.figure(n) for n in plt.get_fignums()]
    for fig, path in zip(figs, written):
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close("all")
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="suite result JSONs")
    ap.add_argument("--out", required=True, help="folder of the figures")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in args.files:
        for path in plot_suite(json.loads(Path(f).read_text()), out):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
