"""Quality vs KV bytes of the low-bit channel methods (KIVI, Coupled Quantization), alone and composed with eviction
and SqueezeAttention's allocation, on the default model (SmolLM2-135M-Instruct, CPU, real weights).

    python benchmarks/channel_eval.py --out benchmarks/results/channel/cpu_smollm2 --calib-dir /tmp/cq

Reuses the eval harness (:mod:`squeezekv.eval`): its needle and perplexity examples (Paul Graham essays, Linux kernel
documentation pages of >= 20,000 characters), its greedy generation and continuation log-likelihood. Coupled
Quantization's codebooks come from ``<calib-dir>/cq<bits>.pt`` (made by ``squeezekv calibrate-cq``;
calibrated here if absent) on short kernel documentation pages the evaluation never reads.

Writes ``<out>.jsonl`` (one record per cell and example; resumable) and ``<out>.json`` (per-cell summary: needle
retrieval, mean NLL and perplexity per source, KV bytes per prompt token measured after the prefill, and the ratio to
the full cache's bytes on the same example).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

import squeezekv  # noqa: E402
from squeezekv.eval.data import Sources  # noqa: E402
from squeezekv.eval.grid import continuation_nll, generate, read_records, score, versions  # noqa: E402
from squeezekv.eval.tasks import TaskOptions, build_examples  # noqa: E402

NO_EVICTION = 8192  # tokens per layer: more than any prompt here, so nothing is evicted

#: cell name -> make_cache arguments (None = transformers' full DynamicCache)
def cells(calib_dir: Path) -> dict[str, dict[str, Any] | None]:
    cq = lambda bits, residual=0: {"bits": bits, "residual": residual,  # noqa: E731
                                   "calibration": str(calib_dir / f"cq{bits}.pt")}
    kivi = lambda bits: {"bits": bits, "group_size": 32, "residual": 128}  # noqa: E731 - the paper's settings
    return {
        "full": None,
        "kivi4": dict(method="window", budget=NO_EVICTION, channel="kivi", channel_params=kivi(4)),
        "kivi2": dict(method="window", budget=NO_EVICTION, channel="kivi", channel_params=kivi(2)),
        "cq2": dict(method="window", budget=NO_EVICTION, channel="coupled", channel_params=cq(2)),
        "cq1": dict(method="window", budget=NO_EVICTION, channel="coupled", channel_params=cq(1)),
        "cq1+r128": dict(method="window", budget=NO_EVICTION, channel="coupled", channel_params=cq(1, 128)),
        "snapkv0.3/squeeze": dict(method="snapkv", budget=0.3, allocation="squeeze"),
        "snapkv0.3/squeeze+kivi2": dict(method="snapkv", budget=0.3, allocation="squeeze", channel="kivi",
                                        channel_params=kivi(2)),
        "h2o0.3/squeeze": dict(method="h2o", budget=0.3, allocation="squeeze"),
        "h2o0.3/squeeze+kivi2": dict(method="h2o", budget=0.3, allocation="squeeze", channel="kivi",
                                     channel_params=kivi(2)),
        "snapkv0.3/squeeze+cq2": dict(method="snapkv", budget=0.3, allocation="squeeze", channel="coupled",
                                      channel_params=cq(2)),
    }


def factory(model: Any, spec: dict[str, Any] | None, methods: dict[str, Any]):
    from transformers import DynamicCache

    if spec is None:
        return (lambda: DynamicCache(config=model.config)), squeezekv.dynamic_cache_nbytes
    spec = dict(spec)
    calib = (spec.get("channel_params") or {}).get("calibration")
    waited = 0
    while calib and not Path(calib).is_file() and waited < 3600:  # being made by `python -m ...coupled`
        time.sleep(30)
        waited += 30

    def make() -> Any:
        cache = squeezekv.make_cache(model, spec["method"], spec["budget"], spec.get("allocation", "uniform"),
                                     channel=spec.get("channel"), channel_params=spec.get("channel_params"))
        return cache

    return make, lambda c: c.nbytes()


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    full_bytes = {r["example_id"]: r["kv_bytes_after_prefill"] for r in records if r["cell"] == "full"}
    out: dict[str, Any] = {}
    for cell in dict.fromkeys(r["cell"] for r in records):
        rs = [r for r in records if r["cell"] == cell]
        row: dict[str, Any] = {"n": len(rs)}
        needle = [r["scores"]["retrieval"] for r in rs if r["task"] == "needle"]
        if needle:
            row["needle_retrieval"] = sum(needle) / len(needle)
            row["needle_n"] = len(needle)
        for src in sorted({r["subset"] for r in rs if r["task"] == "ppl"}):
            nll = [r["scores"]["nll"] for r in rs if r["task"] == "ppl" and r["subset"] == src]
            row[f"nll_{src}"] = sum(nll) / len(nll)
            row[f"ppl_{src}"] = math.exp(sum(nll) / len(nll))
        nll = [r["scores"]["nll"] for r in rs if r["task"] == "ppl"]
        if nll:
            row["nll_all"] = sum(nll) / len(nll)
            row["ppl_all"] = math.exp(row["nll_all"])
        row["kv_bytes_per_token"] = sum(r["kv_bytes_after_prefill"] / r["prompt_tokens"] for r in rs) / len(rs)
        ratios = [r["kv_bytes_after_prefill"] / full_bytes[r["example_id"]] for r in rs if r["example_id"] in full_bytes]
        if ratios:
            row["kv_bytes_vs_full"] = sum(ratios) / len(ratios)
        out[cell] = row
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="path prefix of the .jsonl records and .json summary")
    ap.add_argument("--calib-dir", default="/tmp/cq")
    ap.add_argument("--cells", default="", help="comma-separated subset of the cells")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="needle,ppl")
    ap.add_argument("--needle-lengths", default="1000,2000")
    ap.add_argument("--needles", type=int, default=2)
    ap.add_argument("--needle-depths", default="0.1,0.5,0.9")
    ap.add_argument("--ppl-docs", type=int, default=2)
    ap.add_argument("--ppl-prefix", type=int, default=1024)
    ap.add_argument("--ppl-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from squeezekv.assets import load_model

    model, tokenizer = load_model(None)
    opts = TaskOptions(needle_lengths=tuple(int(x) for x in args.needle_lengths.split(",")),
                       needle_depths=tuple(float(x) for x in args.needle_depths.split(",")),
                       needles=args.needles, ppl_docs=args.ppl_docs, ppl_prefix=args.ppl_prefix,
                       ppl_tokens=args.ppl_tokens)
    examples = build_examples(args.tasks.split(","), tokenizer, Sources(), opts)
    table = cells(Path(args.calib_dir))
    names = [c for c in args.cells.split(",") if c] or list(table)
    bad = [c for c in names if c not in table]
    if bad:
        raise ValueError(f"unknown cells {bad}; choose from {list(table)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    done = {(r["cell"], r["example_id"]) for r in read_records(jsonl)}
    eos = {tokenizer.eos_token_id}
    vers = versions()
    methods: dict[str, Any] = {}
    with open(jsonl, "a", encoding="utf-8") as fh:
        for name in names:  # cell by cell (a cell's calibration file may still be in the making)
            for ex in examples:
                if (name, ex.id) in done:
                    continue
                make, nbytes = factory(model, table[name], methods)
                t0 = time.perf_counter()
                answer = nll = None
                if ex.kind == "generate":
                    toks, held = generate(model, list(ex.prompt), make, nbytes, ex.max_new_tokens, eos, "cpu")
                    answer = tokenizer.decode(toks, skip_special_tokens=True).strip()
                else:
                    nll, held = continuation_nll(model, list(ex.prompt), list(ex.continuation), make, nbytes, "cpu")
                rec = {"cell": name, "spec": table[name], "task": ex.task, "subset": ex.subset, "example_id": ex.id,
                       "meta": ex.meta, "prompt_tokens": len(ex.prompt), "answer": answer,
                       "scores": score(ex, answer, nll), "kv_bytes_after_prefill": held,
                       "seconds": time.perf_counter() - t0, "versions": vers, "dtype": "float32"}
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                print(f"{name:28s} {ex.id:40s} {rec['scores']} {held / len(ex.prompt):9.0f} B/token "
                      f"{rec['seconds']:.1f}s", flush=True)
    records = [r for r in read_records(jsonl) if r["cell"] in names]
    summary = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "dtype": "float32", "task_options": vars(opts),
               "cells": {n: table[n] for n in names}, "versions": vers, "summary": summarise(records)}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
    for cell, row in summary["summary"].items():
        print(cell, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
