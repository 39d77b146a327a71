"""Decode speed and KV bytes of Shared Attention vs the full cache, on a randomly initialised model of a real size.

    python benchmarks/shared_attention_decode.py --out DIR                       # GPU: Llama-3.1-8B shape, bf16
    python benchmarks/shared_attention_decode.py --config benchmarks/tiny_config.json --device cpu --shared 1 \
        --batches 1 --out /tmp/sa-tiny                                           # CPU smoke test

Weights are random (values do not matter for speed). Each cache is filled directly with random keys/values of the
right shapes as it stands right after a ``context``-token prompt (bench.py does the same), then ``decode_steps``
greedy steps are timed (synchronised, after ``warmup`` steps, median of ``reps`` repetitions). Configs:

* ``full``: transformers' ``DynamicCache``, stock SDPA attention (the reference of every ratio);
* ``squeezekv``: squeezekv's cache holding every token, no sharing (squeezekv's own overhead);
* ``sa:K``: shared_attention, one span of ``K`` shared layers at the top (``[L-1-K, L-1]``, the paper shares late
  layers): the ``K`` layers hold values only and skip ``QK^T``/softmax; the span's first layer computes explicit
  softmax weights (eager math). The model still runs the shared layers' q/k projections (no model edits);
* ``snapkv:B`` and ``sa:K+snapkv:B``: the cache evicted to ``B`` of the context (uniform), without/with sharing.

Writes ``DIR/shared_attention_decode.json`` with the config, the device and every measurement (``oom`` when a
config does not fit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import transformers  # noqa: E402

import squeezekv  # noqa: E402
from squeezekv.bench import build_model, full_cache, greedy_decode, is_oom, kv_bytes  # noqa: E402
from squeezekv.crosslayer.shared_attention import SharedLayer  # noqa: E402
from squeezekv.plan import BudgetPlan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]



def free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()



def parse(spec: str, layers: int) -> tuple[int, float | None]:
    """``"sa:8+snapkv:0.3"`` -> (8 shared layers, budget 0.3); ``"squeezekv"`` -> (0, None)."""
    shared, budget = 0, None
    for part in spec.split("+"):
        name, _, arg = part.partition(":")
        if name == "sa":
            shared = int(arg)
        elif name == "snapkv":
            budget = float(arg)
        elif name != "squeezekv":
            raise ValueError(f"unknown config part {part!r}")
    if shared > layers - 1:
        raise ValueError(f"{spec}: cannot share {shared} of {layers} layers")
    return shared, budget


def make_cache(model: Any, spec: str, batch: int, context: int, device: str) -> Any:
    """A filled cache as right after a ``context``-token prompt."""
    cfg = model.config
    hkv, d, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    dtype = next(model.parameters()).dtype
    if spec == "full":
        return full_cache(model, batch, context, device)
    shared, budget = parse(spec, layers)
    n = context if budget is None else max(1, int(round(budget * context)))
    plan = BudgetPlan(budgets=(n,) * layers, base=n, allocation="uniform")
    extra = {}
    if shared:
        extra = {"crosslayer": "shared_attention", "crosslayer_params": {"spans": [[layers - 1 - shared, layers - 1]]}}
    cache = squeezekv.make_cache(model, "snapkv", n, "uniform", method_params={"window": min(64, n)}, plan=plan,
                                 **extra)
    for layer in cache.layers:
        k = torch.randn(batch, hkv, n, d, device=device, dtype=dtype)
        layer.lazy_initialization(k, k)  # SharedLayer: keys stay [B, H, 0, D]
        if not isinstance(layer, SharedLayer):
            layer.keys = k
        layer.values = torch.randn_like(k)
        idx = torch.arange(context - n, context, device=device, dtype=torch.int32)
        layer.token_idx = idx.expand(batch, hkv, n).contiguous()
        if layer.scores is not None:
            layer.scores = torch.rand(batch, hkv, n, device=device)
        layer.seen, layer.prefill_done, layer.compressed = context, True, n < context
    return cache


@torch.no_grad()
def decode(model: Any, spec: str, batch: int, context: int, steps: int, warmup: int, reps: int,
           device: str) -> dict[str, Any]:
    cache = make_cache(model, spec, batch, context, device)
    live = kv_bytes(cache)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    per_step, times = greedy_decode(model, cache, ids, steps, warmup, reps, device)
    res = {"config": spec, "batch": batch, "context": context, "ms_per_step": 1e3 * per_step,
           "tokens_per_s": batch / per_step, "kv_bytes_start": live, "kv_bytes_end": kv_bytes(cache),
           "times_s": times}
    if device.startswith("cuda"):
        res["peak_allocated"] = torch.cuda.max_memory_allocated()
    del cache
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--config", default=str(ROOT / "benchmarks" / "throughput_config.json"),
                    help="model shape and dtype (the throughput benchmark's config: Llama-3.1-8B shape, bf16)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--shared", default="8,16", help="numbers of shared layers")
    ap.add_argument("--budget", type=float, default=0.3, help="eviction budget stacked on top")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for a smoke test")
    cfg = json.loads(Path(args.config).read_text())
    if args.device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(cfg.get("cudnn_sdpa", False))  # as bench.py: no per-shape plans
    model = build_model(cfg, args.device)
    shared = [int(k) for k in args.shared.split(",") if k]
    specs = ["full", "squeezekv"] + [f"sa:{k}" for k in shared] + [f"snapkv:{args.budget:g}"] + [
        f"sa:{max(shared)}+snapkv:{args.budget:g}"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "config": cfg, "args": vars(args), "specs": specs,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "squeezekv": squeezekv.__version__,
        "decode": [],
    }
    path = out / "shared_attention_decode.json"
    for batch in [int(b) for b in args.batches.split(",")]:
        base = None
        for spec in specs:
            try:
                r = decode(model, spec, batch, args.context, args.steps, args.warmup, args.reps, args.device)
            except Exception as err:  # noqa: BLE001 - only out-of-memory is expected
                if not is_oom(err):
                    raise
                r = {"config": spec, "batch": batch, "context": args.context, "oom": True}
            free(args.device)
            if spec == "full" and not r.get("oom"):
                base = r
            if base is not None and not r.get("oom"):
                r["speed_vs_full"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["kv_bytes_vs_full"] = r["kv_bytes_start"] / base["kv_bytes_start"]
            report["decode"].append(r)
            path.write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps({k: v for k, v in r.items() if k != "times_s"}), flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
