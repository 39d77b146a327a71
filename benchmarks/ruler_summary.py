"""The RULER answer on Qwen2.5-Coder-1.5B-Instruct, from the committed grid folders (docs/results.md, "RULER").

    python benchmarks/ruler_summary.py            # writes benchmarks/results/eval_ruler_qwen1.5b/summary.json, the
                                                  # plots under docs/img/ruler/ and the table in docs/results.md
    python benchmarks/ruler_summary.py --check    # exit 1 if any of them differs from what the folders give

The grid folders are ``ruler_snapkv`` (suite eval_ruler_snapkv_gpu) and ``ruler_more`` (eval_ruler_more_gpu). Their
examples come from one generator (``squeezekv.eval.ruler``: one random stream per subtask, length and example index),
so ``ruler/4k/vt/3`` is the same prompt in both: records are joined on the example id (checked: the same prompt
length, and the full cache's answer where both folders ran it). Every comparison is paired over the examples both
cells ran; intervals are 95% percentile bootstraps over examples (``squeezekv.eval.scoring.bootstrap_ci``); the sign
test counts the examples where one cell scored higher.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from squeezekv.eval.grid import FULL, read_records  # noqa: E402
from squeezekv.eval.report import MIN_N_VERDICT  # noqa: E402
from squeezekv.eval.scoring import bootstrap_ci, mean  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "eval_ruler_qwen1.5b"
FOLDERS = ("ruler_snapkv", "ruler_more")
PLANS = RESULTS / "squeeze_plans_cpu.json"
SUMMARY = RESULTS / "summary.json"
IMG = ROOT / "docs" / "img" / "ruler"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- ruler-summary:start -->", "<!-- ruler-summary:end -->"
LENGTHS = ("4k", "8k")


def load() -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, Any]]:
    """cell -> example id -> record over both folders, and what was checked while joining them."""
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    checks = {"folders": list(FOLDERS), "full_cache_overlap": 0, "full_cache_same_answer": 0}
    lengths: dict[str, int] = {}  # example id -> prompt tokens, the same in every cell of both folders
    for folder in FOLDERS:
        for r in read_records(RESULTS / folder / "results.jsonl"):
            if r["task"] != "ruler":
                continue
            if lengths.setdefault(r["example_id"], r["prompt_tokens"]) != r["prompt_tokens"]:
                raise ValueError(f"{r['example_id']}: prompts of {lengths[r['example_id']]} and {r['prompt_tokens']} "
                                 "tokens: the records' examples differ")
            have = cells.setdefault(r["cell"], {})
            old = have.get(r["example_id"])
            if old is not None:
                if r["cell"] == FULL:
                    checks["full_cache_overlap"] += 1
                    checks["full_cache_same_answer"] += old["answer"] == r["answer"]
                continue
            have[r["example_id"]] = r
    return cells, checks


def score(r: dict[str, Any]) -> float:
    return 100.0 * r["scores"]["ruler"]


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of wins vs losses (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * p)


def paired(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """a minus b over the examples both ran."""
    ids = sorted(set(a) & set(b))
    if not ids:
        return None
    d = [score(a[i]) - score(b[i]) for i in ids]
    lo, hi = bootstrap_ci(d)
    wins, losses = sum(x > 0 for x in d), sum(x < 0 for x in d)
    return {"n": len(ids), "delta": mean(d), "ci_low": lo, "ci_high": hi, "better": wins, "worse": losses,
            "tied": len(ids) - wins - losses, "sign_test_p": sign_test(wins, losses),
            "verdict": f"n < {MIN_N_VERDICT}: no verdict" if len(ids) < MIN_N_VERDICT else
            "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"}


def describe(cell: str, recs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    r0 = next(iter(recs.values()))
    return {"cell": cell, "source": "kvpress 0.5.5" if cell.startswith("kvpress:") else "squeezekv",
            "policy": r0.get("policy", r0["method"].split(":")[-1]), "allocation": r0["allocation"],
            "budget": r0["budget"],
            "channel": r0.get("channel", "none")}


def table_rows(cells: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    full = cells[FULL]
    rows = []
    for cell in sorted(cells, key=lambda c: (c != FULL, c.startswith("kvpress:"), c)):
        recs = cells[cell]
        row = describe(cell, recs)
        row["n"] = len(recs)
        for label in LENGTHS:
            vals = [score(r) for r in recs.values() if r["subset"].startswith(label + "/")]
            row[f"n_{label}"] = len(vals)
            row[f"score_{label}"] = mean(vals) if vals else None
        vals = [score(r) for r in recs.values()]
        row["score"] = mean(vals)
        row["ci_low"], row["ci_high"] = bootstrap_ci(vals)
        # KV bytes held after the prefill (what the cache allocated), and their share of the full cache's on the
        # same examples
        row["kv_mib"] = mean([r["kv_bytes_after_prefill"] for r in recs.values()]) / 2 ** 20
        ratios = [r["kv_bytes_after_prefill"] / full[i]["kv_bytes_after_prefill"] for i, r in recs.items() if i in full]
        row["kv_bytes_vs_full"] = mean(ratios) if ratios else None
        vs = paired(recs, full) if cell != FULL else None
        for k in ("n", "delta", "ci_low", "ci_high"):
            row[f"vs_full_{k}"] = None if vs is None else vs[k]
        rows.append(row)
    return rows


def squeeze_answer(cells: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """SqueezeAttention (and pyramid) minus uniform, per policy and budget, paired."""
    out = []
    for cell in sorted(cells):
        parts = cell.split("/")
        if len(parts) != 3 or parts[1] == "uniform" or cell.startswith("kvpress:") or "+" in parts[0]:
            continue
        base = f"{parts[0]}/uniform/{parts[2]}"
        if base in cells:
            res = paired(cells[cell], cells[base])
            if res:
                out.append({"policy": parts[0], "allocation": parts[1], "vs": "uniform", "budget": float(parts[2]),
                            **res})
    return out


def kvpress_side(cells: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """squeezekv's policy (uniform) minus kvpress's press of the same method and budget, paired; and the two full
    caches."""
    pairs = [("full", "kvpress:full")]
    for press, ours in (("snapkv", "snapkv"), ("streamingllm", "streamingllm")):
        for b in ("0.2", "0.5"):
            pairs.append((f"{ours}/uniform/{b}", f"kvpress:{press}/kvpress/{b}"))
    for b in ("0.2", "0.5"):
        pairs.append((f"snapkv/pyramid/{b}", f"kvpress:pyramidkv/kvpress/{b}"))
    out = []
    for ours, theirs in pairs:
        if ours in cells and theirs in cells:
            res = paired(cells[ours], cells[theirs])
            if res:
                same = sum(cells[ours][i]["answer"] == cells[theirs][i]["answer"]
                           for i in set(cells[ours]) & set(cells[theirs]))
                out.append({"squeezekv": ours, "kvpress": theirs, "identical_answers": same, **res})
    return out


def equal_quality(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method x allocation: the smallest measured budget whose paired difference from the full cache is within
    1 point (point estimate), with the interval; None where no measured budget is."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["cell"] in (FULL, "kvpress:full") or r["vs_full_n"] is None:
            continue
        key = (r["source"], r["policy"], r["allocation"], r["channel"])
        groups.setdefault(key, []).append(r)
    out = []
    for (source, policy, alloc, channel), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["budget"])
        ok = [r for r in rs if r["vs_full_delta"] >= -1.0]
        best = ok[0] if ok else None
        out.append({"source": source, "policy": policy, "allocation": alloc, "channel": channel,
                    "budgets_measured": [r["budget"] for r in rs],
                    "smallest_budget_within_1_point": None if best is None else best["budget"],
                    "delta_there": None if best is None else best["vs_full_delta"],
                    "interval_there": None if best is None else [best["vs_full_ci_low"], best["vs_full_ci_high"]],
                    "kv_bytes_vs_full_there": None if best is None else best["kv_bytes_vs_full"],
                    "closest_delta": max(r["vs_full_delta"] for r in rs)})
    return out


def plans_summary() -> dict[str, Any] | None:
    if not PLANS.exists():
        return None
    data = json.loads(PLANS.read_text())
    out = []
    for p in data["plans"]:
        base = p["base"]
        shrunk = [i for i, b in enumerate(p["budgets"]) if b < base]
        out.append({"example_id": p["example_id"], "prompt_tokens": p["prompt_tokens"], "base": base,
                    "layers_shrunk": len(shrunk), "shrunk_budget": min(p["budgets"]),
                    "layers_grown": [i for i, b in enumerate(p["budgets"]) if b > base],
                    "grown_budget": max(p["budgets"]),
                    "importance_min": min(p["importance"]), "importance_max": max(p["importance"]),
                    "cluster_centers": [round(c, 3) for c in p["details"].get("cluster_centers", [])]})
    return {"source": PLANS.name, "config": data.get("config"), "plans": out}


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def label(row: dict[str, Any]) -> str:
    if row["cell"] == FULL:
        return "full cache"
    if row["source"] != "squeezekv":
        return f"kvpress {row['cell'].split(':')[1].split('/')[0]}"
    if row["policy"] == "none":
        return row["channel"]
    if row["channel"] not in ("none", None):
        return f"{row['policy']} + {row['channel']} ({row['allocation']})"
    return f"{row['policy']} ({row['allocation']})"


def markdown(summary: dict[str, Any]) -> str:
    rows = summary["table"]
    lines = [
        "| cache | budget | n | 4k | 8k | all [95% CI] | vs full, paired [95% CI] | KV MiB after prefill | KV / full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs_txt = "—" if r["vs_full_n"] is None else \
            f"{r['vs_full_delta']:+.1f} [{r['vs_full_ci_low']:+.1f}, {r['vs_full_ci_high']:+.1f}] (n={r['vs_full_n']})"
        budget = "—" if r["cell"] == FULL or r["policy"] == "none" else fmt(r["budget"], 2)
        lines.append(
            f"| {label(r)} | {budget} | {r['n']} | {fmt(r['score_4k'])} ({r['n_4k']}) | {fmt(r['score_8k'])} "
            f"({r['n_8k']}) | {fmt(r['score'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}] | {vs_txt} | "
            f"{fmt(r['kv_mib'])} | {fmt(r['kv_bytes_vs_full'], 3)} |")
    lines += ["", "SqueezeAttention (and pyramid) minus uniform at the same total budget, paired over the same "
              "examples:", "",
              "| policy | allocation | budget | n | difference (points) [95% CI] | better / worse / tied | "
              "sign test p | verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in summary["squeeze_vs_uniform"]:
        lines.append(f"| {c['policy']} | {c['allocation']} | {fmt(c['budget'], 2)} | {c['n']} | {c['delta']:+.1f} "
                     f"[{c['ci_low']:+.1f}, {c['ci_high']:+.1f}] | {c['better']} / {c['worse']} / {c['tied']} | "
                     f"{c['sign_test_p']:.2g} | {c['verdict']} |")
    lines += ["", "squeezekv minus kvpress for the same method and budget, paired (identical answers counted):", "",
              "| squeezekv | kvpress | n | difference (points) [95% CI] | identical answers | verdict |",
              "|---|---|---|---|---|---|"]
    for c in summary["squeezekv_vs_kvpress"]:
        lines.append(f"| {c['squeezekv']} | {c['kvpress']} | {c['n']} | {c['delta']:+.1f} [{c['ci_low']:+.1f}, "
                     f"{c['ci_high']:+.1f}] | {c['identical_answers']} | {c['verdict']} |")
    lines += ["", "Memory saved at equal quality: the smallest measured budget within 1 point of the full cache "
              "(paired point estimate):", "",
              "| cache | budgets measured | smallest within 1 point | difference there [95% CI] | KV / full there | "
              "closest difference |", "|---|---|---|---|---|---|"]
    for e in summary["equal_quality"]:
        name = (f"kvpress {e['policy']}" if e["source"] != "squeezekv" else
                e["channel"] if e["policy"] == "none" else
                f"{e['policy']}" + (f" + {e['channel']}" if e["channel"] not in ("none", None) else "")
                + f" ({e['allocation']})")
        there = "—" if e["delta_there"] is None else \
            f"{e['delta_there']:+.1f} [{e['interval_there'][0]:+.1f}, {e['interval_there'][1]:+.1f}]"
        lines.append(f"| {name} | {', '.join(fmt(b, 2) for b in e['budgets_measured'])} | "
                     f"{fmt(e['smallest_budget_within_1_point'], 2)} | {there} | "
                     f"{fmt(e['kv_bytes_vs_full_there'], 3)} | {e['closest_delta']:+.1f} |")
    plans = summary.get("squeeze_plans")
    if plans:
        lines += ["", f"SqueezeAttention's plans at budget 0.2 on RULER 4k prompts ({plans['source']}, CPU float32; "
                  "layers 0-27):", "", "| example | prompt tokens | base budget | layers shrunk | their budget | "
                  "layers given more | their budget | layer similarity min / max | k-means centres |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in plans["plans"]:
            lines.append(f"| {p['example_id']} | {p['prompt_tokens']} | {p['base']} | {p['layers_shrunk']} | "
                         f"{p['shrunk_budget']} | {', '.join(map(str, p['layers_grown']))} | {p['grown_budget']} | "
                         f"{p['importance_min']:.3f} / {p['importance_max']:.3f} | "
                         f"{', '.join(f'{c:.3f}' for c in p['cluster_centers'])} |")
    return "\n".join(lines)


def plots(summary: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    rows = summary["table"]
    full = next(r for r in rows if r["cell"] == FULL)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["cell"] in (FULL, "kvpress:full"):
            continue
        key = label(r) if r["source"] == "squeezekv" else "kvpress " + r["cell"].split(":")[1].split("/")[0]
        series.setdefault(key, []).append(r)
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>ph*"
    for k, (key, rs) in enumerate(sorted(series.items())):
        rs.sort(key=lambda r: r["kv_mib"])
        style = "--" if key.startswith("kvpress") else "-"
        ax.errorbar([r["kv_mib"] for r in rs], [r["score"] for r in rs], color=colors[k % len(colors)],
                    marker=markers[k % len(markers)],
                    yerr=[[r["score"] - r["ci_low"] for r in rs], [r["ci_high"] - r["score"] for r in rs]],
                    linestyle=style, capsize=2, label=key)
    ax.errorbar([full["kv_mib"]], [full["score"]], yerr=[[full["score"] - full["ci_low"]],
                                                          [full["ci_high"] - full["score"]]],
                marker="*", markersize=12, color="k", label="full cache")
    ax.set_xlabel("KV MiB after prefill (mean over examples)")
    ax.set_ylabel("RULER score, 4k+8k (points)")
    ax.set_title("Qwen2.5-Coder-1.5B-Instruct, RULER 4k/8k, H200 bf16\n(each cell on the examples it ran; n in docs)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "score_vs_kv_bytes.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if PLANS.exists():
        data = json.loads(PLANS.read_text())
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True)
        for p in data["plans"]:
            a1.plot(range(len(p["budgets"])), [b / p["base"] for b in p["budgets"]], marker=".",
                    label=p["example_id"])
            a2.plot(range(len(p["importance"])), p["importance"], marker=".", label=p["example_id"])
        a1.axhline(1.0, color="k", linewidth=0.8)
        a1.set_ylabel("layer budget / base")
        a1.set_title("SqueezeAttention plans at budget 0.2 (RULER 4k prompts)")
        a1.legend(fontsize=6)
        a2.set_ylabel("cos similarity (in/out of attention)")
        a2.set_xlabel("layer")
        for a in (a1, a2):
            a.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "squeeze_plans.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def build() -> dict[str, Any]:
    cells, checks = load()
    rows = table_rows(cells)
    return {"model": "qwen2.5-1.5b (Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF converted to bfloat16)",
            "task": "RULER 4k and 8k, 13 subtasks", "device": "NVIDIA H200",
            "sources": [f"{f}/results.jsonl" for f in FOLDERS], "checks": checks, "table": rows,
            "squeeze_vs_uniform": squeeze_answer(cells), "squeezekv_vs_kvpress": kvpress_side(cells),
            "equal_quality": equal_quality(rows), "squeeze_plans": plans_summary()}


def render_doc(text: str, block: str) -> str:
    if START not in text or END not in text:
        raise ValueError(f"{DOC} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if summary.json or docs/results.md is stale")
    args = ap.parse_args(argv)
    summary = build()
    text = json.dumps(summary, indent=1) + "\n"
    doc = render_doc(DOC.read_text(), markdown(summary))
    if args.check:
        stale = [str(p.relative_to(ROOT)) for p, want in ((SUMMARY, text), (DOC, doc))
                 if not p.exists() or p.read_text() != want]
        if stale:
            print("stale (run python benchmarks/ruler_summary.py): " + ", ".join(stale))
            return 1
        return 0
    SUMMARY.write_text(text)
    DOC.write_text(doc)
    for p in plots(summary, IMG):
        print(f"wrote {p.relative_to(ROOT)}")
    print(f"wrote {SUMMARY.relative_to(ROOT)} and the RULER tables in {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
