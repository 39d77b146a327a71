"""From ``results.jsonl`` to a summary CSV, PNG plots and one HTML report.

Scales: needle retrieval, QA F1 and EM in points (0-100); perplexity as ``exp(mean NLL per token)``. Every cell has
``n`` (examples) and a 95% percentile-bootstrap interval over examples. Comparisons of SqueezeAttention (or pyramid)
with uniform are paired over the same examples at the same total budget.
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import Any

from .grid import FULL, read_records
from .scoring import bootstrap_ci, mean

#: metric -> (label, transform of a mean of per-example scores, higher is better)
METRICS: dict[str, tuple[str, Any, bool]] = {
    "retrieval": ("needle retrieval (points)", lambda m: 100 * m, True),
    "f1": ("QA token F1 (points)", lambda m: 100 * m, True),
    "em": ("QA exact match (points)", lambda m: 100 * m, True),
    "nll": ("perplexity", math.exp, False),
    "ruler": ("RULER string match (points)", lambda m: 100 * m, True),
}
#: fewest paired examples for a better/worse verdict (a bootstrap of fewer says nothing)
MIN_N_VERDICT = 5
SUMMARY_FIELDS = ["task", "subset", "metric", "cell", "method", "allocation", "budget", "n", "value", "ci_low",
                  "ci_high", "full_value", "delta_vs_full", "kv_bytes_ratio"]


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(task, subset, metric) -> records; tasks with several subsets also get an ``all`` subset, and subsets named
    ``"<group>/<name>"`` (RULER's ``"4k/niah_single_1"``) a ``"<group>/all"`` subset per group."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    subsets: dict[str, set[str]] = {}
    for r in records:
        subsets.setdefault(r["task"], set()).add(r["subset"])
    for r in records:
        for metric in r["scores"]:
            out.setdefault((r["task"], r["subset"] or "all", metric), []).append(r)
            if len(subsets[r["task"]]) > 1:
                out.setdefault((r["task"], "all", metric), []).append(r)
            if "/" in (r["subset"] or ""):
                group = r["subset"].split("/", 1)[0]
                out.setdefault((r["task"], f"{group}/all", metric), []).append(r)
    return out


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, subset, metric, cell) with n, value, 95% bootstrap interval and the full-cache value."""
    rows = []
    for (task, subset, metric), recs in sorted(_groups(records).items()):
        _, fn, _ = METRICS[metric]
        by_cell: dict[str, list[dict[str, Any]]] = {}
        for r in recs:
            by_cell.setdefault(r["cell"], []).append(r)
        full = {r["example_id"]: r for r in by_cell.get(FULL, [])}
        for cell, rs in sorted(by_cell.items(), key=lambda kv: (kv[0] != FULL, kv[0])):
            vals = [r["scores"][metric] for r in rs]
            lo, hi = bootstrap_ci(vals)
            value = fn(mean(vals))
            # the full cache on the same examples as this cell (a partial grid may have more full-cache records)
            same = [full[r["example_id"]]["scores"][metric] for r in rs if r["example_id"] in full]
            full_value = fn(mean(same)) if len(same) == len(rs) else None
            full_bytes = {i: f["kv_bytes_after_prefill"] for i, f in full.items()}
            ratios = [r["kv_bytes_after_prefill"] / full_bytes[r["example_id"]] for r in rs
                      if full_bytes.get(r["example_id"])]
            rows.append({
                "task": task, "subset": subset, "metric": metric, "cell": cell, "method": rs[0]["method"],
                "allocation": rs[0]["allocation"], "budget": rs[0]["budget"], "n": len(vals),
                "value": value, "ci_low": fn(lo), "ci_high": fn(hi), "full_value": full_value,
                "delta_vs_full": None if full_value is None else value - full_value,
                "kv_bytes_ratio": mean(ratios) if ratios else None,
            })
    return rows


def paired_comparisons(records: list[dict[str, Any]], baseline: str = "uniform") -> list[dict[str, Any]]:
    """Each non-baseline allocation vs ``baseline`` for the same method, budget and examples: mean paired difference
    (in the metric's display scale for points; in NLL per token for perplexity) with a bootstrap interval, and a
    verdict (better / worse when the interval excludes 0) from :data:`MIN_N_VERDICT` examples on."""
    rows = []
    for (task, subset, metric), recs in sorted(_groups(records).items()):
        index = {(r["method"], r["allocation"], r["budget"], r["example_id"]): r["scores"][metric] for r in recs
                 if r["method"] != FULL}
        keys = sorted({(m, a, b) for m, a, b, _ in index if a != baseline})
        scale = 100.0 if METRICS[metric][2] else 1.0
        for m, a, b in keys:
            diffs = [scale * (index[(m, a, b, e)] - index[(m, baseline, b, e)]) for mm, aa, bb, e in index
                     if (mm, aa, bb) == (m, a, b) and (m, baseline, b, e) in index]
            if not diffs:
                continue
            if not METRICS[metric][2]:
                diffs = [-d for d in diffs]  # lower NLL is better: report the improvement
            lo, hi = bootstrap_ci(diffs)
            if len(diffs) < MIN_N_VERDICT:
                verdict = f"n < {MIN_N_VERDICT}: no verdict"
            else:
                verdict = "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"
            rows.append({"task": task, "subset": subset, "metric": metric, "method": m, "allocation": a,
                         "vs": baseline, "budget": b, "n": len(diffs), "gain": mean(diffs), "ci_low": lo,
                         "ci_high": hi, "verdict": verdict,
                         "unit": "points" if METRICS[metric][2] else "NLL/token lower"})
    return rows


def within_one_point(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Smallest budget at which each method x allocation is within 1 point (perplexity: within 1) of the full cache,
    and stays there at every larger budget measured."""
    out = []
    keyed: dict[tuple, list[dict[str, Any]]] = {}
    for r in summary:
        if r["method"] != FULL and r["full_value"] is not None:
            keyed.setdefault((r["task"], r["subset"], r["metric"], r["method"], r["allocation"]), []).append(r)
    for key, rows in sorted(keyed.items()):
        rows.sort(key=lambda r: r["budget"])
        ok = [abs(r["delta_vs_full"]) <= 1.0 for r in rows]
        found = None
        for i in range(len(rows)):
            if all(ok[i:]):
                found = rows[i]["budget"]
                break
        out.append({"task": key[0], "subset": key[1], "metric": key[2], "method": key[3], "allocation": key[4],
                    "budget_within_1": found, "budgets_measured": [r["budget"] for r in rows]})
    return out


def full_cache_check(records: list[dict[str, Any]], other: str = "kvpress:full") -> list[dict[str, Any]]:
    """Per task: does the full cache score the same under squeezekv's transformers and under kvpress's (``other``)?
    Counts identical answers and the largest NLL difference over the examples both ran."""
    ours = {r["example_id"]: r for r in records if r["cell"] == FULL}
    theirs = {r["example_id"]: r for r in records if r["cell"] == other}
    out = []
    for task in sorted({r["task"] for r in theirs.values()}):
        ids = [i for i, r in theirs.items() if r["task"] == task and i in ours]
        if not ids:
            continue
        same_answer = sum(ours[i]["answer"] == theirs[i]["answer"] for i in ids)
        same_scores = sum(ours[i]["scores"] == theirs[i]["scores"] for i in ids)
        nll = [abs(ours[i]["scores"]["nll"] - theirs[i]["scores"]["nll"]) for i in ids if "nll" in ours[i]["scores"]]
        out.append({"task": task, "n": len(ids), "identical_answers": same_answer, "identical_scores": same_scores,
                    "max_abs_nll_diff": max(nll) if nll else None,
                    "versions": f"{ours[ids[0]]['versions'].get('transformers')} vs "
                                f"{theirs[ids[0]]['versions'].get('transformers')}"})
    return out


def write_csv(rows: list[dict[str, Any]], path: Path, fields: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def plot_quality(summary: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per (task, subset, metric): one panel per method, quality vs budget, a line per allocation, full cache dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    keys = sorted({(r["task"], r["subset"], r["metric"]) for r in summary})
    for task, subset, metric in keys:
        rows = [r for r in summary if (r["task"], r["subset"], r["metric"]) == (task, subset, metric)]
        methods = sorted({r["method"] for r in rows if r["method"] != FULL})
        if not methods:
            continue
        full = next((r for r in rows if r["method"] == FULL), None)
        fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.0), sharey=True, squeeze=False)
        for ax, method in zip(axes[0], methods):
            for alloc in sorted({r["allocation"] for r in rows if r["method"] == method}):
                pts = sorted((r for r in rows if r["method"] == method and r["allocation"] == alloc),
                             key=lambda r: r["budget"])
                x = [r["budget"] for r in pts]
                y = [r["value"] for r in pts]
                err = [[r["value"] - r["ci_low"] for r in pts], [r["ci_high"] - r["value"] for r in pts]]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=alloc)
            if full is not None:
                ax.axhline(full["value"], color="black", linestyle="--", linewidth=1, label="full cache")
                ax.axhspan(full["ci_low"], full["ci_high"], color="black", alpha=0.08)
            ax.set_title(method)
            ax.set_xlabel("budget (fraction of prompt)")
        axes[0][0].set_ylabel(METRICS[metric][0])
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{task} {subset} — n={rows[0]['n']} per point, 95% bootstrap CI", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"quality_{task}_{subset.replace(' ', '-').replace('/', '_')}_{metric}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_needle_heatmaps(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Needle retrieval, depth x length, one panel per cell; one figure per budget (the full cache in each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    needle = [r for r in records if r["task"] == "needle"]
    if not needle:
        return []
    lengths = sorted({r["meta"]["length"] for r in needle})
    depths = sorted({r["meta"]["depth"] for r in needle})

    def grid(rs: list[dict[str, Any]]) -> list[list[float]]:
        cells: dict[tuple, list[float]] = {}
        for r in rs:
            cells.setdefault((r["meta"]["depth"], r["meta"]["length"]), []).append(r["scores"]["retrieval"])
        return [[100 * mean(cells[(d, l)]) if (d, l) in cells else float("nan") for l in lengths] for d in depths]

    paths = []
    budgets = sorted({r["budget"] for r in needle if r["method"] != FULL})
    methods = sorted({r["method"] for r in needle if r["method"] != FULL})
    allocs = sorted({r["allocation"] for r in needle if r["method"] != FULL})
    full = [r for r in needle if r["method"] == FULL]
    for budget in budgets:
        fig, axes = plt.subplots(len(methods), len(allocs) + 1, figsize=(2.4 * (len(allocs) + 1), 2.0 * len(methods)),
                                 squeeze=False)
        for i, method in enumerate(methods):
            panels = [("full cache", full)] + [
                (f"{method} {a} {budget:g}", [r for r in needle if r["method"] == method and r["allocation"] == a
                                             and r["budget"] == budget]) for a in allocs]
            for j, (title, rs) in enumerate(panels):
                ax = axes[i][j]
                im = ax.imshow(grid(rs), vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
                ax.set_title(title, fontsize=7)
                ax.set_xticks(range(len(lengths)), [str(l) for l in lengths], fontsize=6)
                ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=6)
        fig.colorbar(im, ax=axes, shrink=0.6, label="retrieval (points)")
        fig.supxlabel("haystack length (tokens)", fontsize=8)
        fig.supylabel("needle depth", fontsize=8)
        path = out_dir / f"needle_heatmap_budget{budget:g}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.2f}"
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]], fields: list[str]) -> str:
    head = "".join(f"<th>{html.escape(f)}</th>" for f in fields)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(f))}</td>" for f in fields) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def markdown(summary: list[dict[str, Any]], comps: list[dict[str, Any]], within: list[dict[str, Any]],
             check: list[dict[str, Any]]) -> str:
    """The report's tables as Markdown (for docs/results.md)."""
    lines = ["| task | subset | metric | cell | n | value | 95% CI | vs full | KV bytes / full |", "|" + "---|" * 9]
    for r in summary:
        delta = "" if r["delta_vs_full"] is None or r["cell"] == FULL else f"{r['delta_vs_full']:+.1f}"
        ratio = "" if r["kv_bytes_ratio"] is None else f"{r['kv_bytes_ratio']:.3f}"
        lines.append(f"| {r['task']} | {r['subset']} | {r['metric']} | {r['cell']} | {r['n']} | {r['value']:.2f} | "
                     f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] | {delta} | {ratio} |")
    lines += ["", "| task | subset | metric | method | allocation vs uniform | budget | n | gain | 95% CI | verdict |",
              "|" + "---|" * 10]
    for r in comps:
        lines.append(f"| {r['task']} | {r['subset']} | {r['metric']} | {r['method']} | {r['allocation']} | "
                     f"{r['budget']:g} | {r['n']} | {r['gain']:+.3f} | [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
                     f"{r['verdict']} |")
    lines += ["",
              "| task | subset | metric | method | allocation | smallest budget within 1 of full | budgets measured |",
              "|" + "---|" * 7]
    for r in within:
        b = "none" if r["budget_within_1"] is None else f"{r['budget_within_1']:g}"
        lines.append(f"| {r['task']} | {r['subset']} | {r['metric']} | {r['method']} | {r['allocation']} | {b} | "
                     f"{', '.join(f'{x:g}' for x in r['budgets_measured'])} |")
    if check:
        lines += ["", "| task | n | identical answers | identical scores | max abs NLL diff | transformers |",
                  "|" + "---|" * 6]
        for r in check:
            d = "" if r["max_abs_nll_diff"] is None else f"{r['max_abs_nll_diff']:.2e}"
            lines.append(f"| {r['task']} | {r['n']} | {r['identical_answers']} | {r['identical_scores']} | {d} | "
                         f"{r['versions']} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path) -> dict[str, Any]:
    """Read ``results.jsonl`` in ``out_dir``; write ``summary.csv``, ``comparisons.csv``, ``summary.md``, the PNGs
    and ``report.html``. Returns the paths and tables."""
    records = read_records(out_dir / "results.jsonl")
    if not records:
        raise ValueError(f"no records in {out_dir / 'results.jsonl'}: run the grid first")
    config = json.loads((out_dir / "config.json").read_text()) if (out_dir / "config.json").exists() else {}
    summary = summarize(records)
    comps = paired_comparisons(records)
    within = within_one_point(summary)
    check = full_cache_check(records)
    write_csv(summary, out_dir / "summary.csv", SUMMARY_FIELDS)
    comp_fields = ["task", "subset", "metric", "method", "allocation", "vs", "budget", "n", "gain", "ci_low",
                   "ci_high", "verdict", "unit"]
    write_csv(comps, out_dir / "comparisons.csv", comp_fields)
    (out_dir / "summary.md").write_text(markdown(summary, comps, within, check), encoding="utf-8")
    plots = plot_quality(summary, out_dir) + plot_needle_heatmaps(records, out_dir)
    table_rows = [{**r, "95% CI": f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"} for r in summary]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>squeezekv eval</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>",
        "<h1>squeezekv quality evaluation</h1>",
        f"<p>{len(records)} records. Points: 0-100 scale; perplexity = exp(mean NLL per token). Intervals: 95% "
        "percentile bootstrap over examples (2,000 resamples). The full-cache row comes first in each group.</p>",
        "<h2>Summary</h2>",
        _table(table_rows, ["task", "subset", "metric", "cell", "n", "value", "95% CI", "full_value",
                            "delta_vs_full", "kv_bytes_ratio"]),
        "<h2>Allocation vs uniform at equal total budget (paired over examples)</h2>",
        "<p>gain &gt; 0 = better than uniform (points, or NLL per token lower).</p>",
        _table(comps, comp_fields),
        "<h2>Smallest budget within 1 point of the full cache</h2>",
        "<p>Within 1 point (perplexity: within 1) at that budget and every larger budget measured; — = never.</p>",
        _table(within, ["task", "subset", "metric", "method", "allocation", "budget_within_1", "budgets_measured"]),
        "<h2>Full cache: squeezekv's environment vs kvpress's</h2>",
        (_table(check, ["task", "n", "identical_answers", "identical_scores", "max_abs_nll_diff", "versions"])
         if check else "<p>kvpress was not run (pass --kvpress-python).</p>"),
        "<h2>Plots</h2>",
        "".join(f"<p><img src='{html.escape(p.name)}' alt='{html.escape(p.stem)}'></p>" for p in plots),
        "<h2>Config</h2>",
        f"<pre>{html.escape(json.dumps(config, indent=2, default=str))}</pre>",
        "</body></html>",
    ]
    (out_dir / "report.html").write_text("\n".join(parts), encoding="utf-8")
    return {"summary": summary, "comparisons": comps, "within_one_point": within, "full_cache_check": check,
            "plots": plots,
            "html": out_dir / "report.html"}
