"""``squeezekv serve``: arguments, and building the store, engine and app from them (uvicorn runs the app)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..registry import allocation_names, policy_names
from ..store import DiskTier, KVStore, MemoryTier, Tier, namespace, parse_bytes


def add_arguments(p: Any) -> None:
    """The ``squeezekv serve`` arguments, added to its (sub-command) parser ``p``."""
    p.description = (
        "Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics. Each finished "
        "request's KV is saved (asynchronously) into a hierarchy of tiers, keyed by a hash chain over its tokens, and "
        "reused by any later prompt that shares the prefix (CachedAttention, arXiv 2403.19708). Needs the 'serve' "
        "extra: pip install -e '.[serve]'."
    )
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--model", default="default", help="local checkpoint folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the folder's name)")
    p.add_argument("--method", default=None, choices=policy_names(),
                   help="compress each conversation's cache with this policy (default: full cache)")
    p.add_argument("--budget", default="0.5", help="per-layer budget: fraction of the prompt or token count")
    p.add_argument("--allocation", default="uniform", choices=allocation_names())
    p.add_argument("--method-param", action="append", metavar="NAME=VALUE")
    p.add_argument("--allocation-param", action="append", metavar="NAME=VALUE")
    p.add_argument("--gpu-cache", default="8GiB", help="GPU tier capacity (used when --device is CUDA)")
    p.add_argument("--cpu-cache", default="32GiB", help="host-memory tier capacity")
    p.add_argument("--disk-cache", default=None, metavar="DIR:SIZE", help="disk tier, e.g. /var/kv:200GiB")
    p.add_argument("--block", type=int, default=16, help="tokens per hashed block")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-active", type=int, default=8, help="requests running at once")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most (more: HTTP 429)")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--truncation", default="error", choices=["error", "rerotate"],
                   help="prompts longer than the context: reject, or drop the oldest tokens and re-rotate stored keys")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)


def build_tiers(gpu: str, cpu: str, disk: str | None, device: str) -> list[Tier]:
    """Tiers from the command line: a GPU tier only on a CUDA device, a host tier, an optional disk tier."""
    tiers: list[Tier] = []
    if device.startswith("cuda"):
        tiers.append(MemoryTier("gpu", parse_bytes(gpu), device))
    tiers.append(MemoryTier("cpu", parse_bytes(cpu), "cpu"))
    if disk:
        folder, sep, size = disk.rpartition(":")
        if not sep or not folder:
            raise ValueError(f"--disk-cache {disk!r} must look like DIR:SIZE, e.g. /var/kv:200GiB")
        tiers.append(DiskTier(Path(folder), parse_bytes(size)))
    return tiers


def run(args: argparse.Namespace, params: Any) -> int:
    try:
        import uvicorn
    except ImportError:
        print("squeezekv: error: serve needs FastAPI and uvicorn: pip install -e '.[serve]'", file=sys.stderr)
        return 2
    import torch

    from ..assets import load_model, resolve_model
    from ..plan import Budget
    from . import Engine, EngineConfig, create_app

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    Budget.parse(args.budget)
    method_params, allocation_params = params(args.method_param), params(args.allocation_param)
    tiers = build_tiers(args.gpu_cache, args.cpu_cache, args.disk_cache, device)
    path = resolve_model(args.model)
    model, tokenizer = load_model(path, device=device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    name = args.served_model_name or Path(path).name
    config = EngineConfig(model_name=name, method=args.method, budget=args.budget, allocation=args.allocation,
                          method_params=method_params, allocation_params=allocation_params, device=device,
                          max_active=args.max_active, max_queue=args.max_queue, max_new_tokens=args.max_tokens,
                          truncation=args.truncation)
    config.validate()
    root = namespace(model=str(path), dtype=str(next(model.parameters()).dtype), method=args.method,
                     budget=args.budget, allocation=args.allocation, method_params=method_params,
                     allocation_params=allocation_params)
    store = KVStore(tiers, root, block=args.block)
    engine = Engine(model, tokenizer, store, config).start()
    print(f"squeezekv serve: {name} on {device}, tiers "
          + ", ".join(f"{t.name} {t.capacity / 2**30:.1f} GiB" for t in tiers), file=sys.stderr)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="info")
    return 0


__all__ = ["add_arguments", "build_tiers", "run"]
