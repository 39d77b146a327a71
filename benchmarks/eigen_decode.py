"""Eigen Attention decode speed and KV bytes vs the full cache on a Llama-3.1-8B-shaped model (random weights).

    python benchmarks/eigen_decode.py --config benchmarks/throughput_config.json --out DIR      # CUDA machine
    python benchmarks/eigen_decode.py --config benchmarks/tiny_config.json --out DIR --device cpu   # smoke test

Weights and bases are random (speed and memory do not depend on their values): each layer and KV head gets a
random orthonormal basis, and ``--ranks`` fixes the rank kept for keys and values. Every cache is filled directly with
``context`` random tokens (as right after a prompt, nothing evicted), then ``decode_steps`` greedy steps are timed
(synchronised, after ``warmup`` steps, median of ``reps`` repetitions). Methods, each next to the full cache of the
same run:

* ``full``: transformers' ``DynamicCache`` (SDPA);
* ``squeezekv``: squeezekv's own layer without eviction (SnapKV at a budget of the whole context), the code path
  eigen builds on;
* ``eigen-pre:R``: the paper's RoPE treatment (low-rank pre-RoPE keys rebuilt and rotated at every step);
* ``eigen-post:R``: attention in the low-rank space (projected queries, no rebuild).

Writes ``DIR/eigen_decode.json`` with the config, the GPU, versions and one record per (method, batch); an
out-of-memory run is recorded as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import squeezekv  # noqa: E402
from squeezekv.bench import free, full_cache, greedy_decode  # noqa: E402
from squeezekv.channel.eigen import FORMAT  # noqa: E402
from squeezekv.plan import BudgetPlan  # noqa: E402




def random_calibration(config: LlamaConfig, path: Path) -> Path:
    """A calibration file with random orthonormal bases (eigenvalues descending; ranks are fixed by the caller)."""
    layers, heads, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    g = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {"format": FORMAT, "calibration": {"tokens": 0, "source": "random bases"},
                             "model": {"model_type": "llama", "num_layers": layers, "num_kv_heads": heads,
                                       "head_dim": d}}
    lam = torch.linspace(1.0, 0.01, d, dtype=torch.float64).expand(layers, heads, d).contiguous()
    for name in ("key_pre", "key_post", "value"):
        q, _ = torch.linalg.qr(torch.randn(layers, heads, d, d, generator=g, dtype=torch.float64))
        state[name] = {"basis": q.float().contiguous(), "eigenvalues": lam}
    torch.save(state, path)
    return path


def make_cache(model: Any, method: str, batch: int, context: int, calibration: Path, device: str) -> Any:
    """A cache holding ``context`` random tokens per layer, nothing evicted."""
    cfg = model.config
    heads, d, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    dtype = next(model.parameters()).dtype
    if method == "full":
        return full_cache(model, batch, context, device)
    name, _, rank = method.partition(":")
    extra: dict[str, Any] = {}
    if name.startswith("eigen"):
        extra = {"channel": "eigen", "channel_params": {"calibration": str(calibration), "rank": int(rank),
                                                        "rope": name.split("-")[1]}}
    budget = context + 4096  # no eviction
    plan = BudgetPlan(budgets=(budget,) * layers, base=budget, allocation="uniform")
    cache = squeezekv.make_cache(model, "snapkv", budget, "uniform", method_params={"window": 64}, plan=plan,
                                 **extra)
    for layer in cache.layers:
        full = torch.empty(batch, heads, 0, d, device=device, dtype=dtype)
        layer.lazy_initialization(full, full)
        dk, dv = layer.keys.shape[-1], layer.values.shape[-1]
        layer.keys = torch.randn(batch, heads, context, dk, device=device, dtype=dtype)
        layer.values = torch.randn(batch, heads, context, dv, device=device, dtype=dtype)
        layer.token_idx = torch.arange(context, device=device, dtype=torch.int32).expand(batch, heads, context)
        layer.token_idx = layer.token_idx.contiguous()
        if layer.scores is not None:
            layer.scores = torch.zeros(batch, heads, context, device=device)
        if hasattr(layer, "pos_offset"):
            layer.pos_offset = torch.zeros(batch, dtype=torch.long, device=device)
        layer.seen, layer.prefill_done = context, True
    return cache


def kv_bytes(cache: Any) -> int:
    if isinstance(cache, squeezekv.SqueezeCache):
        return cache.kv_nbytes()
    return squeezekv.dynamic_cache_nbytes(cache)


@torch.no_grad()
def decode(model: Any, method: str, batch: int, context: int, calibration: Path, cfg: dict[str, Any],
           device: str) -> dict[str, Any]:
    cache = make_cache(model, method, batch, context, calibration, device)
    live = kv_bytes(cache)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    per_step, times = greedy_decode(model, cache, ids, cfg["decode_steps"], cfg["warmup"], cfg["reps"], device)
    res = {"method": method, "batch": batch, "context": context, "ms_per_step": 1e3 * per_step,
           "tokens_per_s": batch / per_step, "times": times, "kv_bytes": live,
           "kv_bytes_per_token": live / (batch * context)}
    del cache
    free(device)
    return res


def or_oom(fn: Callable[[], dict[str, Any]], device: str, **labels: Any) -> dict[str, Any]:
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - only out-of-memory is expected
        if not (isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()):
            raise
        result = {**labels, "oom": True}
    free(device)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="model shape (benchmarks/throughput_config.json for 8B)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--ranks", default="64,96", help="ranks kept for keys and values (head_dim 128 at 8B shape)")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for a smoke test")
    cfg = json.loads(Path(args.config).read_text())
    run = {"decode_steps": args.decode_steps, "warmup": args.warmup, "reps": args.reps}
    config = LlamaConfig(**cfg["model"])
    config._attn_implementation = "sdpa"
    dtype = getattr(torch, cfg["dtype"]) if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    if args.device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # as squeezekv.bench: no per-shape cuDNN plans
    ranks = [int(r) for r in args.ranks.split(",")]
    context = min(args.context, config.max_position_embeddings - 64)
    methods = ["full", "squeezekv"] + [f"eigen-{m}:{r}" for r in ranks for m in ("pre", "post")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "config": {**cfg, "context": context, "batches": args.batches, "ranks": ranks, **run, "device": args.device,
                   "dtype": str(dtype)},
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "squeezekv": squeezekv.__version__,
        "head_dim": config.head_dim, "decode": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        calibration = random_calibration(config, Path(tmp) / "random_bases.pt")
        for batch in [int(b) for b in args.batches.split(",")]:
            for method in methods:
                r = or_oom(lambda: decode(model, method, batch, context, calibration, run, args.device),
                           args.device, method=method, batch=batch)
                report["decode"].append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "times"}), flush=True)
                (out_dir / "eigen_decode.json").write_text(json.dumps(report, indent=2))
    full = {r["batch"]: r for r in report["decode"] if r["method"] == "full" and not r.get("oom")}
    for r in report["decode"]:
        f = full.get(r["batch"])
        if f is not None and not r.get("oom"):
            r["tokens_per_s_vs_full"] = r["tokens_per_s"] / f["tokens_per_s"]
            r["kv_bytes_vs_full"] = r["kv_bytes"] / f["kv_bytes"]
    (out_dir / "eigen_decode.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
