"""MiniCache on the default model (SmolLM2-135M-Instruct, CPU, float32): perplexity and needle retrieval vs merge depth
and retention threshold, KV bytes, and MiniCache on top of 30% SnapKV eviction. One model load; every compressed
figure has the full cache measured in the same run beside it.

The examples and their scoring are the eval harness's (``squeezekv.eval``: Paul Graham essay needles, perplexity of
essays and Linux kernel docs given a compressed prefix; ``continuation_nll``/``generate`` of the grid). The
adjacent-layer similarity (angular distance of K/V per head and token) is measured on a calibration document that the
evaluation does not use (a Linux kernel doc the perplexity task does not pick).

    python benchmarks/minicache_cpu.py --out benchmarks/results/crosslayer/minicache_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache

import squeezekv
from squeezekv.assets import load_model
from squeezekv.crosslayer.minicache import MiniCacheLayer, angular_distance
from squeezekv.eval.data import Sources
from squeezekv.eval.grid import continuation_nll, generate, score
from squeezekv.eval.tasks import TaskOptions, build_needle, build_ppl

#: name -> (eviction method, budget, minicache parameters or None); budget 1.0 of the prompt = no eviction
CONFIGS: dict[str, tuple[str | None, float, dict[str, Any] | None]] = {
    "full": (None, 1.0, None),
    "mc_s15_g0.05": ("snapkv", 1.0, {"start_layer": 15, "gamma": 0.05}),  # the paper's defaults (S = L/2)
    "mc_s15_g0.5": ("snapkv", 1.0, {"start_layer": 15, "gamma": 0.5}),
    "mc_s15_g1": ("snapkv", 1.0, {"start_layer": 15, "gamma": 1.0}),
    "mc_s15_g0.75": ("snapkv", 1.0, {"start_layer": 15, "gamma": 0.75}),
    "mc_s28_g1": ("snapkv", 1.0, {"start_layer": 28, "gamma": 1.0}),
    "mc_s26_g1": ("snapkv", 1.0, {"start_layer": 26, "gamma": 1.0}),
    "mc_s22_g1": ("snapkv", 1.0, {"start_layer": 22, "gamma": 1.0}),
    "mc_s0_g1": ("snapkv", 1.0, {"start_layer": 0, "gamma": 1.0}),
    "snapkv0.3": ("snapkv", 0.3, None),
    "snapkv0.3_mc_s15_g0.05": ("snapkv", 0.3, {"start_layer": 15, "gamma": 0.05}),
    "snapkv0.3_mc_s15_g1": ("snapkv", 0.3, {"start_layer": 15, "gamma": 1.0}),
}


def adjacent_similarity(model: Any, ids: list[int]) -> list[dict[str, Any]]:
    """Quantiles of the angular distance (arccos(cos) / pi) between layer l and l+1, per KV head and token."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([ids]), cache=cache)
    q = torch.tensor([0.05, 0.5, 0.95])
    out = []
    for layer in range(len(cache.layers) - 1):
        row: dict[str, Any] = {"layers": [layer, layer + 1]}
        for name in ("keys", "values"):
            d = angular_distance(getattr(cache.layers[layer], name), getattr(cache.layers[layer + 1], name))
            row[name] = {"q05": d.quantile(q[0]).item(), "median": d.quantile(q[1]).item(),
                         "q95": d.quantile(q[2]).item(), "mean_cos": torch.cos(d * torch.pi).mean().item()}
        out.append(row)
    return out


def cache_stats(cache: Any, full_kv: int) -> dict[str, Any]:
    pairs = [layer.pair for layer in getattr(cache, "layers", []) if isinstance(layer, MiniCacheLayer)
             and layer.which == 0]
    stats: dict[str, Any] = {"pairs": [list(p.layer_ids) for p in pairs]}
    if pairs:
        held = sum(p.merged_length for p in pairs) * pairs[0].keys.direction.shape[0] * pairs[0].keys.direction.shape[1]
        stats["retained_fraction_keys"] = sum(p.keys.retained_count() for p in pairs) / held
        stats["retained_fraction_values"] = sum(p.values.retained_count() for p in pairs) / held
    if hasattr(cache, "kv_nbytes"):
        stats["kv_bytes"] = cache.kv_nbytes()
        stats["bytes_with_bookkeeping"] = cache.nbytes()
    else:
        stats["kv_bytes"] = stats["bytes_with_bookkeeping"] = squeezekv.dynamic_cache_nbytes(cache)
    stats["kv_fraction_of_full"] = stats["kv_bytes"] / full_kv
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(c for c in CONFIGS if c not in ("mc_s15_g0.75", "mc_s26_g1")),
                    help="the second run added mc_s15_g0.75,mc_s26_g1 (same examples)")
    ap.add_argument("--ppl-docs", type=int, default=1)
    ap.add_argument("--ppl-prefix", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=64)
    ap.add_argument("--needle-length", type=int, default=500)
    ap.add_argument("--needle-depths", default="0.25,0.5,0.75")
    ap.add_argument("--needles", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    model, tok = load_model()
    sources = Sources()
    opts = TaskOptions(needle_lengths=(args.needle_length,), needle_depths=tuple(float(d) for d in args.needle_depths.split(",")),
                       needles=args.needles, ppl_docs=args.ppl_docs, ppl_prefix=args.ppl_prefix,
                       ppl_tokens=args.ppl_tokens)
    examples = build_ppl(tok, sources, opts) + build_needle(tok, sources, opts)
    used = {e.meta.get("doc") for e in examples}
    docs = list(sources.get_docs("linux-doc"))
    random.Random("calibration").shuffle(docs)
    calib_name, calib_text = next((n, t) for n, t in docs if n not in used and len(t) > 20000)
    calib_ids = list(tok(calib_text[:6000], add_special_tokens=False)["input_ids"])[:512]
    t0 = time.time()
    similarity = adjacent_similarity(model, calib_ids)
    print(f"similarity on {calib_name}: {time.time() - t0:.1f}s", flush=True)
    num_layers = model.config.num_hidden_layers
    kv_per_token = 2 * num_layers * model.config.num_key_value_heads * (
        model.config.hidden_size // model.config.num_attention_heads) * 4

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = vars(args) | {
        "model": "SmolLM2-135M-Instruct (float32, CPU)", "configs_def": {n: CONFIGS[n] for n in names},
        "task_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()},
        "calibration_doc": calib_name, "calibration_tokens": len(calib_ids), "kv_bytes_per_token_full": kv_per_token,
        "torch": torch.__version__, "transformers": transformers.__version__, "squeezekv": squeezekv.__version__,
        "machine": platform.platform(), "note": "CPU shared with other jobs: seconds are not performance figures",
    }
    results: list[dict[str, Any]] = []
    for name in names:
        method, budget, mc = CONFIGS[name]

        def factory(method=method, budget=budget, mc=mc):
            if method is None:
                return DynamicCache(config=model.config)
            return squeezekv.make_cache(model, method, budget, "uniform",
                                        crosslayer=None if mc is None else "minicache", crosslayer_params=mc)

        t1 = time.time()
        rows = []
        for ex in examples:
            n_prompt = len(ex.prompt)
            # bytes held after the prefill (the prompt evicted and merged), against a full cache of the prompt
            held = lambda c: cache_stats(c, kv_per_token * n_prompt)  # noqa: E731
            if ex.kind == "loglik":
                nll, stats = continuation_nll(model, list(ex.prompt), list(ex.continuation), factory, held, "cpu")
                answer = None
            else:
                answer_ids, stats = generate(model, list(ex.prompt), factory, held, ex.max_new_tokens,
                                      {tok.eos_token_id}, "cpu")
                answer, nll = tok.decode(answer_ids, skip_special_tokens=True), None
            row = {"id": ex.id, "task": ex.task, "subset": ex.subset, "prompt_tokens": n_prompt,
                   "metrics": score(ex, answer, nll), "answer": answer, **stats}
            rows.append(row)
        ppl_rows = [r for r in rows if r["task"] == "ppl"]
        needle_rows = [r for r in rows if r["task"] == "needle"]
        summary = {
            "config": name, "method": method, "budget": budget, "minicache": mc,
            "merged_layers": 2 * len(rows[0]["pairs"]),
            "nll": sum(r["metrics"]["nll"] for r in ppl_rows) / len(ppl_rows),
            "nll_by_source": {s: sum(r["metrics"]["nll"] for r in ppl_rows if r["subset"] == s)
                              / max(1, sum(1 for r in ppl_rows if r["subset"] == s)) for s in opts.ppl_sources},
            "needle_retrieval": sum(r["metrics"]["retrieval"] for r in needle_rows) / len(needle_rows),
            "kv_fraction_of_full": sum(r["kv_fraction_of_full"] for r in rows) / len(rows),
            "kv_fraction_of_full_ppl": sum(r["kv_fraction_of_full"] for r in ppl_rows) / len(ppl_rows),
            "retained_fraction_keys": (sum(r.get("retained_fraction_keys", 0.0) for r in rows) / len(rows)
                                       if rows[0]["pairs"] else None),
            "retained_fraction_values": (sum(r.get("retained_fraction_values", 0.0) for r in rows) / len(rows)
                                         if rows[0]["pairs"] else None),
            "seconds": time.time() - t1,
        }
        summary["ppl"] = float(torch.tensor(summary["nll"]).exp())
        print(json.dumps({k: v for k, v in summary.items() if k != "minicache"}), flush=True)
        results.append({"summary": summary, "examples": rows})
        out.write_text(json.dumps({"config": config, "adjacent_layer_distance": similarity, "results": results},
                                  indent=1) + "\n")  # after every config: a cut-short run keeps what it measured
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
