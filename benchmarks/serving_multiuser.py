"""Multi-user multi-turn replay through squeezekv's serving engine: hit rate per tier, prefill tokens saved and time to
first token, with the full cache and with a compressed cache (CachedAttention, arXiv 2403.19708, section 5).

``--conversations`` users each hold a ``--turns``-turn conversation. A user's turn ``k + 1`` is submitted as soon as
its turn ``k`` finished (closed loop): its prompt is the whole history (turn ``k``'s prompt, the tokens the engine
generated, a new ``--turn-tokens``-token user message). The first turn of every user is a distinct
``--history``-token context. The engine (``squeezekv.serve.Engine``: fair per-user queue, at most ``--max-active``
running, batched decode of full caches, asynchronous saves, queue-aware prefetch) runs with a ``KVStore`` of three
tiers whose byte capacities are given so that the conversations do not all fit in the fastest tier: entries are
demoted GPU -> CPU -> disk and promoted back when read.

Reported per mode: lookups that hit each tier, misses, prompt tokens vs tokens actually prefilled (saved fraction),
and median TTFT of turns >= 2 against turn 1 (a full recomputation of a prompt of the first-turn size). Meant for a
GPU with ``--random-config benchmarks/throughput_config.json`` (weights do not matter for time or hit rates).

    python benchmarks/serving_multiuser.py --device cuda --random-config benchmarks/throughput_config.json \
        --out benchmarks/results/serving/h200_multiuser.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers

import squeezekv
from squeezekv.bench import build_model
from squeezekv.serve.engine import Engine, EngineConfig, GenRequest
from squeezekv.store import DiskTier, KVStore, MemoryTier, namespace


class _Tokenizer:
    """What the engine needs of a tokenizer for token-id requests on a random model."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def _gib(text: str) -> int:
    return int(float(text) * (1 << 30))


def replay(model, args, method: str | None, tmp: Path) -> dict:
    tiers = []
    if args.device.startswith("cuda"):
        tiers.append(MemoryTier("gpu", _gib(args.gpu_gib), args.device))
    tiers += [MemoryTier("cpu", _gib(args.cpu_gib), "cpu"), DiskTier(tmp / (method or "full"), _gib(args.disk_gib))]
    store = KVStore(tiers, namespace(bench="multiuser", method=method), block=16)
    cfg = EngineConfig(method=method, budget=args.budget, device=args.device, max_active=args.max_active,
                       max_queue=4 * args.conversations, max_new_tokens=args.answer_tokens)
    engine = Engine(model, _Tokenizer(), store, cfg).start()
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    histories = [torch.randint(100, vocab, (args.history,), generator=g).tolist() for _ in range(args.conversations)]
    turns_left = {u: args.turns for u in range(args.conversations)}
    records: list[dict] = []
    lock = threading.Condition()

    def submit(user: int, prompt: list[int]) -> None:
        turn = args.turns - turns_left[user] + 1
        t0 = time.perf_counter()
        first: dict = {}

        def emit(ev: dict) -> None:
            if ev["type"] == "delta" and "ttft" not in first:
                first["ttft"] = time.perf_counter() - t0
            elif ev["type"] in ("done", "error"):
                with lock:
                    if ev["type"] == "error":
                        records.append({"user": user, "turn": turn, "error": ev["message"]})
                    else:
                        usage = ev["usage"]
                        records.append({"user": user, "turn": turn, "prompt_tokens": usage["prompt_tokens"],
                                        "cached_tokens": usage["cached_tokens"], "ttft_s": first.get("ttft"),
                                        "latency_s": time.perf_counter() - t0})
                        turns_left[user] -= 1
                        if turns_left[user] > 0:
                            generated = list(req.generated)  # the whole answer is part of the history
                            new = torch.randint(100, vocab, (args.turn_tokens,), generator=g).tolist()
                            pending.append((user, prompt + generated + new))
                    lock.notify_all()

        req = GenRequest(prompt=prompt, max_tokens=args.answer_tokens, emit=emit, user=f"user{user}")
        engine.submit(req)

    pending: list[tuple[int, list[int]]] = [(u, histories[u]) for u in range(args.conversations)]
    t_start = time.perf_counter()
    with lock:
        while any(turns_left.values()):
            while pending:
                submit(*pending.pop(0))
            lock.wait(timeout=1.0)
            if time.perf_counter() - t_start > args.time_limit:
                print(f"time limit of {args.time_limit} s reached", flush=True)
                break
    wall = time.perf_counter() - t_start
    engine.shutdown()
    store.flush()
    stats = dict(store.stats)
    usage = store.usage()
    store.close()
    ok = [r for r in records if "error" not in r]
    if not ok:
        raise RuntimeError(f"every request failed: {records[:3]}")
    prompt_tokens = sum(r["prompt_tokens"] for r in ok)
    cached = sum(r["cached_tokens"] for r in ok)
    later = [r for r in ok if r["turn"] >= 2]
    lookups = sum(v for k, v in stats.items() if k.startswith("hit_") or k.startswith("miss"))
    hits = {k[4:]: v for k, v in stats.items() if k.startswith("hit_")}
    return {
        "method": method or "full", "budget": args.budget if method else None, "requests": len(records),
        "errors": len(records) - len(ok), "wall_s": wall,
        "lookups": lookups, "hits_per_tier": hits, "misses": stats.get("miss", 0) + stats.get("miss_evicted", 0),
        "hit_rate_per_tier": {k: v / lookups for k, v in hits.items()} if lookups else {},
        "turn2plus_requests": len(later),
        "turn2plus_hit_rate": sum(1 for r in later if r["cached_tokens"]) / len(later) if later else None,
        "prompt_tokens": prompt_tokens, "cached_prompt_tokens": cached,
        "prefill_tokens_saved_fraction": cached / prompt_tokens if prompt_tokens else None,
        "ttft_turn1_median_s": statistics.median(r["ttft_s"] for r in ok if r["turn"] == 1 and r["ttft_s"]),
        "ttft_turn2plus_median_s": statistics.median(r["ttft_s"] for r in later if r["ttft_s"]) if later else None,
        "ttft_turn2plus_p99_s": (sorted(r["ttft_s"] for r in later if r["ttft_s"])[int(0.99 * (len(later) - 1))]
                                 if later else None),
        "store_stats": stats, "tier_usage_at_end": usage, "records": records,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-config", required=True, help="JSON with a 'model' LlamaConfig dict and a 'dtype'")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--history", type=int, default=1024, help="tokens of each user's first prompt")
    ap.add_argument("--turn-tokens", type=int, default=64, help="tokens of each later user message")
    ap.add_argument("--answer-tokens", type=int, default=16, help="tokens generated per turn")
    ap.add_argument("--max-active", type=int, default=8)
    ap.add_argument("--gpu-gib", default="2", help="GPU tier capacity (GiB)")
    ap.add_argument("--cpu-gib", default="4", help="CPU tier capacity (GiB)")
    ap.add_argument("--disk-gib", default="8", help="disk tier capacity (GiB)")
    ap.add_argument("--methods", default="full,snapkv", help="'full' and/or squeezekv methods")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--time-limit", type=float, default=240, help="seconds per mode before giving up")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = json.loads(Path(args.random_config).read_text())
    model = build_model(cfg, args.device)
    torch.backends.cuda.enable_cudnn_sdp(False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    config = vars(args) | {"model": cfg["model"], "dtype": cfg["dtype"], "torch": torch.__version__,
                           "transformers": transformers.__version__, "squeezekv": squeezekv.__version__,
                           "machine": platform.platform(),
                           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.methods.split(","):
            r = replay(model, args, None if m == "full" else m, Path(tmp))
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("records", "store_stats")}), flush=True)
            out.write_text(json.dumps({"config": config, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
