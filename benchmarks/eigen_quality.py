"""Eigen Attention quality vs bytes on the default model (CPU, real weights), with the eval harness's tasks and scorer.

    PYTHONPATH=src python benchmarks/eigen_quality.py --calibration eigen_smollm2.pt \\
        --out benchmarks/results/channel/eigen_quality.json

Cells: the full cache; ``eigen`` (no eviction: SnapKV at budget 1.0 never evicts the prompt) at several energy
thresholds, ``rope="pre"`` (the paper's) and ``"post"``; SnapKV 30% with the squeeze allocation alone and with
``eigen`` on top. Examples come from :mod:`squeezekv.eval.tasks` (needle in Paul Graham essays, perplexity of essays
and Linux kernel documentation pages of >= 20,000 characters — the calibration uses shorter pages only); answers
and NLL are computed by :func:`squeezekv.eval.grid.generate` / :func:`~squeezekv.eval.grid.continuation_nll` and
scored by :func:`squeezekv.eval.grid.score`. Bytes are read from the cache's allocated tensors after the prefill.
Resumable: records already in ``--out`` are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import squeezekv  # noqa: E402
from squeezekv.eval.data import Sources  # noqa: E402
from squeezekv.eval.grid import continuation_nll, generate, score, versions  # noqa: E402
from squeezekv.eval.tasks import TaskOptions, build_examples  # noqa: E402


def cells(calibration: str, thresholds: list[float], post: list[float], combo: list[float]) -> dict[str, dict]:
    """cell name -> make_cache kwargs (None = the full DynamicCache)."""
    def eig(thr: float, rope: str) -> dict[str, Any]:
        return {"channel": "eigen", "channel_params": {"calibration": calibration, "threshold": thr, "rope": rope}}

    none = {"method": "snapkv", "budget": 1.0, "allocation": "uniform"}  # never evicts the prompt
    evict = {"method": "snapkv", "budget": 0.3, "allocation": "squeeze"}
    out: dict[str, Any] = {"full": None}
    for t in thresholds:
        out[f"eigen-pre/{t:g}"] = {**none, **eig(t, "pre")}
    for t in post:
        out[f"eigen-post/{t:g}"] = {**none, **eig(t, "post")}
    out["snapkv/squeeze/0.3"] = dict(evict)
    for t in combo:
        out[f"snapkv/squeeze/0.3+eigen-pre/{t:g}"] = {**evict, **eig(t, "pre")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--thresholds", default="0.9,0.95,0.98")
    ap.add_argument("--post-thresholds", default="0.95")
    ap.add_argument("--combo-thresholds", default="0.95")
    ap.add_argument("--needle-depths", default="0.25")
    ap.add_argument("--needles", type=int, default=1)
    ap.add_argument("--ppl-docs", type=int, default=1)
    ap.add_argument("--ppl-tokens", type=int, default=128)
    ap.add_argument("--ppl-prefix", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    floats = lambda s: [float(x) for x in s.split(",") if x.strip()]  # noqa: E731
    from squeezekv.assets import load_model

    model, tokenizer = load_model("default")
    opts = TaskOptions(needle_lengths=(1000,), needle_depths=tuple(floats(args.needle_depths)), needles=args.needles,
                       ppl_sources=("essays", "linux-doc"), ppl_docs=args.ppl_docs, ppl_prefix=args.ppl_prefix,
                       ppl_tokens=args.ppl_tokens)
    examples = build_examples(["needle", "ppl"], tokenizer, Sources(), opts)
    grid = cells(args.calibration, floats(args.thresholds), floats(args.post_thresholds),
                 floats(args.combo_thresholds))
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {"records": []}
    done = {(r["cell"], r["example_id"]) for r in report["records"]}
    eos = {tokenizer.eos_token_id}
    report["config"] = {"model": "SmolLM2-135M-Instruct (default)", "dtype": "float32", "device": "cpu",
                        "task_options": vars(opts), "cells": {k: v for k, v in grid.items()},
                        "calibration": args.calibration, "versions": versions()}
    # perplexity first (one forward pass each), then the needles (prefill + greedy decoding)
    examples = [e for e in examples if e.task == "ppl"] + [e for e in examples if e.task != "ppl"]
    for ex in examples:
        for name, kw in grid.items():
            if (name, ex.id) in done:
                continue
            info: dict[str, Any] = {}
            if kw is None:
                factory = lambda: DynamicCache(config=model.config)  # noqa: E731
                nbytes = lambda c: (squeezekv.dynamic_cache_nbytes(c),) * 2  # noqa: E731
            else:
                def factory(kw=kw):
                    kw = dict(kw)
                    cache = squeezekv.make_cache(model, kw.pop("method"), kw.pop("budget"), kw.pop("allocation"),
                                                 **kw)
                    if cache.channel is not None:
                        info["ranks"] = cache.channel.ranks()
                        info["basis_bytes"] = cache.channel.basis_nbytes()
                    return cache
                nbytes = lambda c: (c.kv_nbytes(), c.nbytes())  # noqa: E731
            t0 = time.perf_counter()
            answer = nll = None
            if ex.kind == "generate":
                toks, held = generate(model, list(ex.prompt), factory, nbytes, ex.max_new_tokens, eos, "cpu")
                answer = tokenizer.decode(toks, skip_special_tokens=True).strip()
            else:
                nll, held = continuation_nll(model, list(ex.prompt), list(ex.continuation), factory, nbytes, "cpu")
            rec = {"cell": name, "task": ex.task, "subset": ex.subset, "example_id": ex.id, "meta": ex.meta,
                   "prompt_tokens": len(ex.prompt), "answer": answer, "scores": score(ex, answer, nll),
                   "kv_bytes_after_prefill": held[0], "bytes_after_prefill": held[1],
                   "kv_bytes_per_prompt_token": held[0] / len(ex.prompt), "seconds": time.perf_counter() - t0,
                   **info}
            report["records"].append(rec)
            print(json.dumps({k: rec[k] for k in ("cell", "example_id", "scores", "kv_bytes_per_prompt_token",
                                                  "seconds")}), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1))
    report["summary"] = summarize(report["records"])
    out.write_text(json.dumps(report, indent=1))


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per cell: mean NLL per task subset, needle retrieval, mean KV bytes per prompt token and its ratio to full."""
    out: dict[str, Any] = {}
    full_bpt = [r["kv_bytes_per_prompt_token"] for r in records if r["cell"] == "full"]
    full = sum(full_bpt) / len(full_bpt) if full_bpt else float("nan")
    for cell in dict.fromkeys(r["cell"] for r in records):
        rs = [r for r in records if r["cell"] == cell]
        row: dict[str, Any] = {"n": len(rs)}
        bpt = sum(r["kv_bytes_per_prompt_token"] for r in rs) / len(rs)
        row["kv_bytes_per_prompt_token"] = bpt
        row["kv_bytes_vs_full"] = bpt / full
        needle = [r["scores"]["retrieval"] for r in rs if r["task"] == "needle"]
        if needle:
            row["needle_retrieval"] = sum(needle) / len(needle)
        for subset in ("essays", "linux-doc"):
            nll = [r["scores"]["nll"] for r in rs if r["task"] == "ppl" and r["subset"] == subset]
            if nll:
                row[f"nll_{subset}"] = sum(nll) / len(nll)
        if "ranks" in rs[0]:
            row["ranks"] = rs[0]["ranks"]
        out[cell] = row
    return out


if __name__ == "__main__":
    main()
