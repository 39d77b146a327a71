"""Shared Attention on the default model (CPU, real weights): perplexity and needle retrieval vs the number of shared
layers, with and without sequence eviction on top; KV bytes measured from the caches' allocated tensors.

    PYTHONPATH=src python benchmarks/crosslayer_cpu.py --analysis benchmarks/results/crosslayer/layer_similarity.json \
        --out benchmarks/results/crosslayer/quality_cpu.json

Examples come from the eval harness (:mod:`squeezekv.eval.tasks`: needle in Paul Graham essays, perplexity of essays
and Linux kernel docs) and are scored with its functions (:func:`squeezekv.eval.grid.generate`,
:func:`~squeezekv.eval.grid.continuation_nll`). The spans for ``k`` shared layers are the analysis' proposal
``spans_by_count[k]`` (calibrated on the GPL text, not on these texts). Configs:

* ``full``: transformers' ``DynamicCache``;
* ``sa{k}``: shared_attention with ``k`` shared layers, no eviction (SnapKV at budget 1.0 keeps every token);
* ``{method}{b}`` / ``sa{k}+{method}{b}``: the eviction policy at budget ``b`` (uniform allocation), without and with
  sharing.

Resumable: configs already in ``--out`` are not recomputed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import squeezekv  # noqa: E402
from squeezekv.assets import load_model  # noqa: E402
from squeezekv.eval.data import Sources  # noqa: E402
from squeezekv.eval.grid import continuation_nll, generate, score  # noqa: E402
from squeezekv.eval.tasks import TaskOptions, build_examples  # noqa: E402


def factory(model, name: str, analysis: dict, method: str):
    """(cache factory, bytes function) of a config name."""
    if name == "full":
        return (lambda: DynamicCache(config=model.config)), squeezekv.dynamic_cache_nbytes
    shared, evict = 0, None
    for part in name.split("+"):
        if part.startswith("sa"):
            shared = int(part[2:])
        elif part.startswith(method):
            evict = float(part[len(method):])
        else:
            raise ValueError(f"config {name!r}: unknown part {part!r}")
    spans = analysis["spans_by_count"][str(shared)] if shared else []
    budget = 1.0 if evict is None else evict
    m = "snapkv" if evict is None else method
    params = {"crosslayer": "shared_attention", "crosslayer_params": {"spans": spans}} if spans else {}
    return (lambda: squeezekv.make_cache(model, m, budget, "uniform", **params)), (lambda c: c.nbytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--analysis", required=True, help="layer_similarity.json from squeezekv analyze-layers")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shared", default="0,2,4,8,12,16", help="numbers of shared layers")
    ap.add_argument("--method", default="snapkv", help="eviction policy stacked on top")
    ap.add_argument("--budgets", default="0.3", help="eviction budgets (fractions of the prompt)")
    ap.add_argument("--needle-length", type=int, default=1000)
    ap.add_argument("--needle-depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--needles", type=int, default=1)
    ap.add_argument("--ppl-docs", type=int, default=2, help="documents per source (essays, linux-doc)")
    ap.add_argument("--ppl-prefix", type=int, default=1024)
    ap.add_argument("--ppl-tokens", type=int, default=256)
    ap.add_argument("--configs", default="", help="comma-separated config names, in this order, instead of the "
                    "full grid (e.g. full,sa8,snapkv0.3,sa8+snapkv0.3)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    analysis = json.loads(Path(args.analysis).read_text())
    model, tokenizer = load_model(None)
    opts = TaskOptions(needle_lengths=(args.needle_length,),
                       needle_depths=tuple(float(d) for d in args.needle_depths.split(",")), needles=args.needles,
                       ppl_sources=("essays", "linux-doc"), ppl_docs=args.ppl_docs, ppl_prefix=args.ppl_prefix,
                       ppl_tokens=args.ppl_tokens)
    examples = build_examples(["needle", "ppl"], tokenizer, Sources(), opts)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    counts = [int(c) for c in args.shared.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    configs = ["full"] + [f"sa{k}" for k in counts if k] + [
        (f"sa{k}+" if k else "") + f"{args.method}{b:g}" for b in budgets for k in counts]
    if args.configs:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {
        "model": "SmolLM2-135M-Instruct", "device": "cpu", "dtype": "float32", "analysis": str(args.analysis),
        "options": vars(opts) | {"needle_lengths": list(opts.needle_lengths),
                                 "needle_depths": list(opts.needle_depths), "ppl_sources": list(opts.ppl_sources),
                                 "qa_placements": list(opts.qa_placements)},
        "torch": torch.__version__, "configs": {}}
    for name in configs:
        if name in report["configs"]:
            continue
        make, nbytes = factory(model, name, analysis, args.method)
        t0 = time.perf_counter()
        rows = []
        for ex in examples:
            if ex.kind == "generate":
                toks, held = generate(model, list(ex.prompt), make, nbytes, ex.max_new_tokens, eos, "cpu")
                answer = tokenizer.decode(toks, skip_special_tokens=True)
                rows.append({"id": ex.id, "task": ex.task, "prompt_tokens": len(ex.prompt), "kv_bytes": held,
                             "answer": answer, **score(ex, answer, None)})
            else:
                nll, held = continuation_nll(model, list(ex.prompt), list(ex.continuation), make, nbytes, "cpu")
                rows.append({"id": ex.id, "task": ex.task, "subset": ex.subset, "prompt_tokens": len(ex.prompt),
                             "kv_bytes": held, **score(ex, None, nll)})
        needle = [r["retrieval"] for r in rows if r["task"] == "needle"]
        nlls = [r["nll"] for r in rows if r["task"] == "ppl"]
        ppl_rows = [r for r in rows if r["task"] == "ppl"]
        summary = {
            "spans": factory_spans(name, analysis),
            "needle_retrieval": statistics.mean(needle),
            "ppl": float(torch.tensor(nlls).mean().exp()),
            "ppl_by_source": {s: float(torch.tensor([r["nll"] for r in ppl_rows if r["subset"] == s]).mean().exp())
                              for s in opts.ppl_sources},
            "kv_bytes_ppl_mean": statistics.mean(r["kv_bytes"] for r in ppl_rows),
            "seconds": time.perf_counter() - t0,
        }
        report["configs"][name] = {"summary": summary, "examples": rows}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(name, json.dumps(summary), flush=True)


def factory_spans(name: str, analysis: dict) -> list:
    for part in name.split("+"):
        if part.startswith("sa"):
            return analysis["spans_by_count"][part[2:]]
    return []


if __name__ == "__main__":
    main()
