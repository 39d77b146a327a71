"""Every policy x allocation on the default model with `squeezekv run`'s measurement, one model load.

Writes one JSON with the config beside the results; every compressed figure has the full-cache figure measured in
the same run next to it. CPU timings are not performance results (see issue on GPU performance); bytes, answers and
log-likelihoods are.

    python benchmarks/run_grid.py --budget 0.2 --allocations uniform,squeeze --out benchmarks/results/cpu_budget0.2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

import squeezekv
from squeezekv.assets import load_model
from squeezekv.registry import allocation_names, policy_names
from squeezekv.runner import RunConfig, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="0.2")
    ap.add_argument("--methods", default=",".join(policy_names()))
    ap.add_argument("--allocations", default=",".join(allocation_names()))
    ap.add_argument("--context-tokens", type=int, default=1200)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    loaded = load_model(None, device=args.device)
    config = vars(args) | {
        "torch": torch.__version__, "transformers": transformers.__version__, "squeezekv": squeezekv.__version__,
        "machine": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
    }
    cells = []
    for method in args.methods.split(","):
        for allocation in args.allocations.split(","):
            cfg = RunConfig(method=method, allocation=allocation, budget=args.budget, device=args.device,
                            context_tokens=args.context_tokens, depth=args.depth, max_new_tokens=args.max_new_tokens)
            t = time.time()
            report = run(cfg, progress=False, loaded=loaded)
            full, comp = report["results"]["full"], report["results"]["compressed"]
            cell = {
                "method": method, "allocation": allocation,
                "prompt_tokens": report["prompt_tokens"],
                "full_kv_bytes": full["kv_bytes_after_prefill"], "compressed_kv_bytes": comp["kv_bytes_after_prefill"],
                "compressed_kv_only_bytes_end": comp["kv_only_bytes_end"],
                "memory_ratio": report["summary"]["memory_ratio_after_prefill"],
                "full_found_needle": full["found_needle"], "found_needle": comp["found_needle"],
                "full_answer": full["answer"], "answer": comp["answer"],
                "full_loglik": full["reference_loglik"], "loglik": comp["reference_loglik"],
                "loglik_delta_per_token": report["summary"]["loglik_delta_per_token"],
                "plan": comp["plan"],
                "cpu_decode_speed_ratio": report["summary"]["decode_speed_ratio"],
            }
            cells.append(cell)
            print(f"{method:13s} {allocation:8s} bytes {cell['memory_ratio']:.3f} of full  "
                  f"needle full={cell['full_found_needle']} comp={cell['found_needle']}  "
                  f"loglik full={cell['full_loglik']:.3f} comp={cell['loglik']:.3f}  ({time.time() - t:.0f}s)",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, "reference": report["reference"], "cells": cells}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
