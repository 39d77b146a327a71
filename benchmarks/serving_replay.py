"""Time to first token per turn with KV reuse (from each tier) vs recomputing the history (CachedAttention,
arXiv 2403.19708, reports -87% TTFT). Meant for a GPU. ``--random-config`` builds a randomly initialised model of a
real size from a JSON config (e.g. benchmarks/throughput_config.json's Llama-3.1-8B shape; weights do not matter for
time) instead of loading the default model.

For each history length (default 2k, 4k, 8k, 16k tokens, skipped beyond the model's context) a conversation is
replayed for ``--turns`` turns: turn ``k``'s prompt is the history so far plus a new ``--turn-tokens``-token user
message. Each turn is measured twice, on the same warm model:

* recompute: a fresh cache, prefill the whole prompt, first token;
* reuse from tier T (gpu/cpu/disk): the previous turn's KV is put in tier T of a store whose faster tiers are empty,
  then ``store.get`` + layer-wise load + prefill of the new tokens + first token.

The first token of both must agree (the logits are compared too); timings are medians over ``--repeat`` runs, with
``torch.cuda.synchronize`` around each.

    python benchmarks/serving_replay.py --device cuda --out benchmarks/results/serving_replay_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

import squeezekv
from squeezekv.assets import load_model
from squeezekv.runner import cache_kwargs
from squeezekv.store import DiskTier, KVStore, LayerwiseLoad, MemoryTier, capture, namespace


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def _prefill(model, cache, ids, device):
    return model(input_ids=torch.tensor([ids], device=device), use_cache=True,
                 **cache_kwargs(model, cache)).logits[0, -1]


@torch.no_grad()
def ttft_recompute(model, prompt, device):
    _sync(device)
    t = time.perf_counter()
    logits = _prefill(model, DynamicCache(config=model.config), prompt, device)
    tok = int(logits.argmax())
    _sync(device)
    return time.perf_counter() - t, tok, logits


@torch.no_grad()
def ttft_reuse(model, store, prompt, device):
    _sync(device)
    t = time.perf_counter()
    snap = store.get(prompt)
    if snap is None:
        raise RuntimeError("the stored history was not found")
    with LayerwiseLoad(snap, model, device) as cache:
        logits = _prefill(model, cache, prompt[len(snap.tokens):], device)
    tok = int(logits.argmax())
    _sync(device)
    return time.perf_counter() - t, tok, logits, len(snap.tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-config", default=None, help="JSON with a 'model' LlamaConfig dict and a 'dtype'")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--histories", default="2048,4096,8192,16384")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--tiers", default="gpu,cpu,disk")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.random_config:
        cfg = json.loads(Path(args.random_config).read_text())
        config = transformers.LlamaConfig(**cfg["model"])
        torch.manual_seed(0)
        with torch.device(args.device):
            model = transformers.LlamaForCausalLM(config).to(getattr(torch, cfg["dtype"])).eval()
    else:
        model, _ = load_model(args.model, device=args.device)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    rows = []
    for history in (int(h) for h in args.histories.split(",")):
        total = history + args.turns * args.turn_tokens
        if context and total > context:
            print(f"history {history}: {total} tokens exceed the context of {context}, skipped", flush=True)
            continue
        ids = torch.randint(100, vocab, (total,), generator=g).tolist()
        for turn in range(1, args.turns + 1):
            prompt = ids[: history + turn * args.turn_tokens]
            previous = prompt[: -args.turn_tokens]
            cache = DynamicCache(config=model.config)
            _prefill(model, cache, previous, args.device)
            snap = capture(cache, previous)
            recompute = [ttft_recompute(model, prompt, args.device) for _ in range(args.repeat)]
            row = {"history": history, "turn": turn, "prompt_tokens": len(prompt),
                   "recompute_ttft_s": statistics.median(r[0] for r in recompute)}
            for tier in args.tiers.split(","):
                with tempfile.TemporaryDirectory() as tmp:
                    caps = {"gpu": 0, "cpu": 0, "disk": 0, tier: 1 << 40}
                    tiers = []
                    if args.device.startswith("cuda"):
                        tiers.append(MemoryTier("gpu", caps["gpu"], args.device))
                    tiers += [MemoryTier("cpu", caps["cpu"], "cpu"), DiskTier(Path(tmp), caps["disk"])]
                    if tier == "gpu" and not args.device.startswith("cuda"):
                        continue
                    times = []
                    for _ in range(args.repeat):
                        store = KVStore(tiers, namespace(bench=True), block=16)
                        store.put(snap)
                        dt, tok, logits, reused = ttft_reuse(model, store, prompt, args.device)
                        times.append(dt)
                        store.close()
                        for t in tiers:
                            for key in list(t.sizes):
                                t.remove(key)
                    if tok != recompute[0][1]:
                        print(f"  note: first token differs ({tok} vs {recompute[0][1]})", flush=True)
                    row[f"reuse_{tier}_ttft_s"] = statistics.median(times)
                    row[f"reuse_{tier}_max_abs_logit_diff"] = float((logits.float() - recompute[0][2].float())
                                                                    .abs().max())
                    row["reused_tokens"] = reused
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))  # partial
    config = vars(args) | {"torch": torch.__version__, "transformers": transformers.__version__,
                           "squeezekv": squeezekv.__version__, "machine": platform.platform(),
                           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
