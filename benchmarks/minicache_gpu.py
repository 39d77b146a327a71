"""MiniCache decode speed and KV bytes on a GPU, on a randomly initialised model of a real size (Llama-3.1-8B shape,
bfloat16; the shape from ``benchmarks/throughput_config.json``).

For every setting: a real prefill of ``--context`` random tokens through the cache (so eviction and merging run on
the model's own K/V), the KV bytes held after it, then ``--steps`` greedy decode steps timed (CUDA-synchronised,
``--warmup`` steps first, median of ``--reps`` repetitions). The full cache (transformers' ``DynamicCache``) and the
squeezekv cache without merging are measured in the same run. Out-of-memory is caught and recorded.

With random weights adjacent layers' K/V are unrelated, so the retained fraction at a given ``gamma`` says nothing
about a trained model; ``gamma=1`` (nothing retained but one token per head) is the largest saving and ``gamma=0.05``
(nearly every token retained on unrelated layers) the largest merged storage: the two ends of the cost of rebuilding
merged keys/values at every step.

    python benchmarks/minicache_gpu.py --out results/           # ~2 minutes on one H100
    python benchmarks/minicache_gpu.py --config benchmarks/tiny_config.json --device cpu --out /tmp/mc  # CPU check
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache

import squeezekv
from squeezekv.bench import build_model, free, greedy_decode, is_oom, sync
from squeezekv.crosslayer.minicache import MiniCacheLayer

#: name -> (squeezekv method or None for DynamicCache, budget fraction, minicache parameters or None);
#: "mid": merging from the middle layer (the paper's S = L / 2, 16 of 32)
SETTINGS: dict[str, tuple[str | None, float, dict[str, Any] | None]] = {
    "full": (None, 1.0, None),
    "none": ("none", 1.0, None),  # squeezekv cache, nothing evicted, nothing merged
    "mc_mid_g1": ("none", 1.0, {"start_layer": None, "gamma": 1.0}),
    "mc_mid_g0.05": ("none", 1.0, {"start_layer": None, "gamma": 0.05}),
    "snapkv0.3": ("snapkv", 0.3, None),
    "snapkv0.3_mc_mid_g1": ("snapkv", 0.3, {"start_layer": None, "gamma": 1.0}),
}






def kv_bytes(cache: Any) -> int:
    return cache.kv_nbytes() if isinstance(cache, squeezekv.SqueezeCache) else squeezekv.dynamic_cache_nbytes(cache)


@torch.no_grad()
def measure(model: Any, name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    method, budget, mc = SETTINGS[name]
    dev = args.device
    if method is None:
        squeezekv.detach(model)
        cache = DynamicCache(config=model.config)
    else:
        # snapkv's observation window must fit the budget: 64 tokens, or less for tiny contexts
        window = min(64, max(1, int(budget * args.context) // 2))
        params = {"window": window} if method == "snapkv" else None
        cache = squeezekv.make_cache(model, method, budget, "uniform", method_params=params,
                                     crosslayer=None if mc is None else "minicache", crosslayer_params=mc)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, args.context), generator=g).to(dev)
    sync(dev)
    t = time.perf_counter()
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    sync(dev)
    prefill_s = time.perf_counter() - t
    held = kv_bytes(cache)
    pairs = [l.pair for l in cache.layers if isinstance(l, MiniCacheLayer) and l.which == 0] if method else []
    retained = None
    if pairs:
        total = sum(p.merged_length for p in pairs) * batch * model.config.num_key_value_heads
        retained = sum(p.keys.retained_count() + p.values.retained_count() for p in pairs) / (2 * total)
    per_step, times = greedy_decode(model, cache, logits[:, -1:].argmax(-1), args.steps, args.warmup, args.reps, dev)
    res = {"setting": name, "batch": batch, "context": args.context, "prefill_s": prefill_s,
           "kv_bytes_after_prefill": held, "kv_bytes_end": kv_bytes(cache), "ms_per_step": 1e3 * per_step,
           "tokens_per_s": batch / per_step, "times": times, "merged_pairs": len(pairs),
           "retained_fraction": retained}
    if dev.startswith("cuda"):
        res["peak_allocated"] = torch.cuda.max_memory_allocated()
    del cache
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).with_name("throughput_config.json")))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = json.loads(Path(args.config).read_text())
    names = args.settings.split(",")
    bad = [n for n in names if n not in SETTINGS]
    if bad:
        raise SystemExit(f"unknown setting(s) {bad}; choose from {', '.join(SETTINGS)}")
    model = build_model(cfg, args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = vars(args) | {"model": cfg["model"], "dtype": cfg["dtype"], "settings_def": {n: SETTINGS[n] for n in names},
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "machine": platform.platform(),
                           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        for name in names:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            try:
                res = measure(model, name, batch, args)
            except Exception as err:  # noqa: BLE001 - only out-of-memory is expected
                if not is_oom(err):
                    raise
                res = {"setting": name, "batch": batch, "context": args.context, "oom": True}
            free(args.device)
            results.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "times"}), flush=True)
            (out_dir / "minicache_gpu.json").write_text(json.dumps({"config": config, "results": results}, indent=1))
    full = {r["batch"]: r for r in results if r["setting"] == "full" and not r.get("oom")}
    for r in results:
        f = full.get(r["batch"])
        if f and not r.get("oom"):
            r["kv_ratio_vs_full"] = r["kv_bytes_after_prefill"] / f["kv_bytes_after_prefill"]
            r["speed_ratio_vs_full"] = r["tokens_per_s"] / f["tokens_per_s"]
    (out_dir / "minicache_gpu.json").write_text(json.dumps({"config": config, "results": results}, indent=1))
    print(f"wrote {out_dir / 'minicache_gpu.json'}")


if __name__ == "__main__":
    main()
