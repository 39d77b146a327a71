"""GPU throughput and memory: squeezekv's caches vs the full cache on a Llama-3.1-8B-shaped model.

Run on a CUDA machine (weights are random: values do not matter for speed or memory)::

    squeezekv bench --config benchmarks/throughput_config.json --out results.json
    python benchmarks/run.py throughput --out DIR   # the same measurements as a benchmark suite

Measures, each compressed figure next to the full cache's from the same run (CUDA-synchronised, after warm-up, median
of ``reps`` repetitions):

* prefill (batch 1, real forward) at each context: time, peak memory over the weights, KV bytes after, and the
  compression overhead (prefill time with the compressed cache over the full cache's, minus one);
* decode tokens/s at several batch sizes at ``context`` tokens: the cache is filled directly with random keys/values
  of the right shapes (the full cache: ``context`` tokens; a compressed one: its budget, as right after the prompt's
  compression), then ``decode_steps`` greedy steps are timed. A compressed cache the decode runtime can run
  (:func:`runtime_unavailable` is None: its policies, no channel or cross-layer method, eager decoder) decodes through
  :class:`~squeezekv.runtime.runtime.DecodeRuntime` (rows ``"decoder": "runtime"``: one random request of the budget's
  shape admitted into every slot of a pool of ``batch`` slots; a CUDA graph per batch), next to a reference row of the
  eager path (``"decoder": "eager"``, method ``<name> decoder=eager``; config ``eager_reference: false`` or
  ``--no-eager-reference`` drops it; ``runtime: false`` or ``--no-runtime`` decodes every cache eagerly as before);
* max batch that fits (doubling then bisection, out-of-memory caught and memory released between tries);
* fraction of the memory-bandwidth roofline: (weight bytes + live KV bytes) / bandwidth over the measured step time.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import squeezekv

from .plan import BudgetPlan
from .spec import CacheSpec

#: datasheet HBM bandwidth by card (bytes/s), for the roofline fraction
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def hbm_bandwidth() -> float:
    name = torch.cuda.get_device_name()
    for key, value in HBM_BYTES_PER_S.items():
        if key in name:
            return value
    raise ValueError(f"no HBM bandwidth known for {name!r}: add it to HBM_BYTES_PER_S")


def sync(device: str = "cuda") -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str = "cuda") -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def build_model(cfg: dict[str, Any], device: str = "cuda") -> LlamaForCausalLM:
    """The benchmark's randomly initialised model (``cfg["model"]``: a LlamaConfig dict, ``cfg["dtype"]``), seed 0."""
    config = LlamaConfig(**cfg["model"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, cfg["dtype"]))
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def full_cache(model: Any, batch: int, context: int, device: str = "cuda") -> DynamicCache:
    """The full ``DynamicCache`` (squeezekv detached from ``model``) holding ``context`` random keys/values per layer
    ``[batch, kv_heads, context, head_dim]``, as right after a prompt (0: empty)."""
    cfg = model.config
    squeezekv.detach(model)
    cache = DynamicCache(config=cfg)
    dtype = next(model.parameters()).dtype
    if context:
        for i in range(cfg.num_hidden_layers):
            k = torch.randn(batch, cfg.num_key_value_heads, context, cfg.head_dim, device=device, dtype=dtype)
            cache.update(k, torch.randn_like(k), i)
    return cache


@dataclass(frozen=True)
class BenchCache:
    """One cache the benchmark measures: ``spec`` None is transformers' full ``DynamicCache``; ``decoder``
    ``"eager"`` runs the model step by step, ``"graph"`` replays one CUDA graph per chunk (:class:`GraphDecoder`,
    chunk = the spec's ``evict_every``)."""

    name: str
    spec: CacheSpec | None
    decoder: str = "eager"

    @classmethod
    def parse(cls, entry: Any) -> "BenchCache":
        """``"full"``, a :class:`CacheSpec` text (``"method=window evict_every=16"``), or ``{"cache": SPEC,
        "decoder": "graph", "name": ...}``."""
        if isinstance(entry, str):
            entry = {"cache": entry}
        if not isinstance(entry, dict) or "cache" not in entry or set(entry) - {"cache", "decoder", "name"}:
            raise ValueError(f"benchmark cache {entry!r} must be 'full', a cache spec text, or a dict with keys "
                             "cache, decoder ('eager' or 'graph'), name")
        decoder = entry.get("decoder", "eager")
        if decoder not in ("eager", "graph"):
            raise ValueError(f"decoder={decoder!r} is not supported: 'eager' or 'graph'")
        spec = None if entry["cache"] == "full" else CacheSpec.of(entry["cache"]).validate()
        if spec is None and decoder != "eager":
            raise ValueError("the full cache decodes eagerly (decoder='eager')")
        name = entry.get("name") or (entry["cache"] + ("" if decoder == "eager" else " decoder=graph"))
        return cls(name, spec, decoder)


def runtime_unavailable(model: Any, entry: BenchCache) -> str | None:
    """Why ``entry`` decodes on the eager path rather than through the decode runtime (None: the runtime runs it)."""
    from .runtime.runtime import SUPPORTED_POLICIES

    if entry.spec is None:
        return "the full cache decodes eagerly"
    if entry.decoder != "eager":
        return f"decoder={entry.decoder!r} is its own path"
    if entry.spec.method not in SUPPORTED_POLICIES:
        return f"the runtime runs the policies {SUPPORTED_POLICIES}, not {entry.spec.method!r}"
    if entry.spec.channel is not None or entry.spec.crosslayer is not None:
        return "the runtime's pool holds plain squeezekv layers (no channel or cross-layer method)"
    cfg = model.config
    if getattr(cfg, "sliding_window", None) or any(t != "full_attention" for t in getattr(cfg, "layer_types", None)
                                                   or []):
        return "the runtime supports models whose every layer is full attention"
    return None


def make_cache(model: Any, entry: BenchCache | str, budget_tokens: int, batch: int, context: int, fill: bool,
               device: str = "cuda") -> Any:
    """A cache as it stands right after a ``context``-token prompt: full, or compressed to ``budget_tokens`` per layer
    (uniform; the spec's budget and allocation are replaced; ``fill``: random keys/values of the last
    ``budget_tokens`` positions put in each layer with :meth:`SqueezeLayer.fill`)."""
    entry = entry if isinstance(entry, BenchCache) else BenchCache.parse(entry)
    cfg = model.config
    kv_heads, head_dim, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    dtype = next(model.parameters()).dtype
    if entry.spec is None:
        return full_cache(model, batch, context if fill else 0, device)
    plan = BudgetPlan(budgets=(budget_tokens,) * layers, base=budget_tokens, allocation="uniform")
    spec = entry.spec.replace(budget=budget_tokens, allocation="uniform")
    if spec.method == "snapkv" and "window" not in spec.method_params:
        spec = spec.replace(method_params={**spec.method_params, "window": 64})
    cache = squeezekv.make_cache(model, spec, plan=plan)
    if fill:
        idx = torch.arange(context - budget_tokens, context, device=device)  # [n]: the prompt's last positions
        for layer in cache.layers:
            k = torch.randn(batch, kv_heads, budget_tokens, head_dim, device=device, dtype=dtype)  # [B, H, n, D]
            scores = torch.rand(batch, kv_heads, budget_tokens, device=device) if cache.policy.uses_scores else None
            layer.fill(k, torch.randn_like(k), idx, scores, seen=context)
    return cache


def kv_bytes(cache: Any) -> int:
    if isinstance(cache, squeezekv.SqueezeCache):
        return cache.nbytes()
    return squeezekv.dynamic_cache_nbytes(cache)


def timed(fn: Callable[[], Any], reps: int, device: str = "cuda") -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn``, synchronised with the device before and after."""
    out = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def greedy_decode(model: Any, cache: Any, first: torch.Tensor, steps: int, warmup: int, reps: int,
                  device: str = "cuda", step: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[float, list[float]]:
    """Greedy decoding from ``first`` ``[B, 1]`` on ``cache``: ``warmup`` steps, then ``reps`` timed runs of
    ``steps`` steps (:func:`timed`). ``step(ids) -> next ids`` replaces the model call (e.g. a CUDA graph).
    Returns (median seconds per step, seconds of each run)."""
    if step is None:
        def step(ids: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    ids = first

    def one() -> None:
        nonlocal ids
        ids = step(ids)

    for _ in range(warmup):
        one()
    times = timed(lambda: [one() for _ in range(steps)], reps, device)
    return statistics.median(times) / steps, times


@torch.no_grad()
def prefill(model: Any, method: BenchCache, context: int, budget: float, reps: int, chunk: int = 0) -> dict[str, Any]:
    """Prefill of one ``context``-token prompt (in chunks of ``chunk`` tokens, compressing after each, if > 0)."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), device="cuda")
    base = torch.cuda.memory_allocated()
    holder: dict[str, Any] = {}

    def once() -> None:
        holder.pop("cache", None)
        free()
        cache = make_cache(model, method, max(1, int(round(budget * context))), 1, context, fill=False)
        if chunk:
            squeezekv.chunked_prefill(model, ids, cache, chunk)
        else:
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        holder["cache"] = cache

    once()  # warm-up
    torch.cuda.reset_peak_memory_stats()
    times = timed(once, reps)
    peak = torch.cuda.max_memory_allocated() - base
    res = {"method": method.name, "context": context, "prefill_chunk": chunk, "prefill_s": statistics.median(times),
           "times": times,
           "peak_bytes_over_weights": peak, "kv_bytes": kv_bytes(holder["cache"])}
    holder.clear()
    free()
    return res


def _cuda_figures(model: Any, live: int, per_step: float, device: str) -> dict[str, Any]:
    """Roofline fraction and peak memory of a decode measurement (CUDA only: none on a CPU check)."""
    if not str(device).startswith("cuda"):
        return {}
    return {"roofline_fraction": (weight_bytes(model) + live) / hbm_bandwidth() / per_step,
            "peak_allocated": torch.cuda.max_memory_allocated()}


@torch.no_grad()
def decode(model: Any, method: BenchCache, batch: int, context: int, budget_tokens: int, steps: int, warmup: int,
           reps: int, device: str = "cuda") -> dict[str, Any]:
    """Decode of the model step by step on ``method``'s cache (eager, or its GraphDecoder), filled at ``batch``."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cache = make_cache(model, method, budget_tokens, batch, context, fill=True, device=device)
    live = kv_bytes(cache)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)  # [B, 1]
    graph = None
    if method.decoder == "graph":
        from .graphs import GraphDecoder

        graph = GraphDecoder(model, cache, chunk=method.spec.evict_every)

    per_step, _ = greedy_decode(model, cache, ids, steps, warmup, reps, device,
                                step=None if graph is None else lambda x: graph.step(x).argmax(-1, keepdim=True))
    res = {"method": method.name, "decoder": method.decoder, "batch": batch, "context": context,
           "ms_per_step": 1e3 * per_step, "tokens_per_s": batch / per_step, "kv_bytes_start": live,
           "kv_bytes_end": kv_bytes(cache), **_cuda_figures(model, live, per_step, device)}
    cache = graph = None  # released before free()
    free(device)
    return res


@torch.no_grad()
def decode_runtime(model: Any, method: BenchCache, batch: int, context: int, budget_tokens: int, steps: int,
                   warmup: int, reps: int, device: str = "cuda") -> dict[str, Any]:
    """Decode through :class:`~squeezekv.runtime.runtime.DecodeRuntime`: one request filled with random keys/values
    of the budget's shape (:func:`make_cache`, batch 1, as right after its prompt's compression) admitted into every
    slot of a pool of ``batch`` slots sized for the timed steps (a CUDA graph per batch on CUDA), then ``steps``
    batched greedy steps timed as :func:`decode` times them. ``kv_bytes_start``: ``batch`` times the request's
    bytes (what :func:`decode` reports for the same cache at ``batch``); ``pool_bytes``: what the pool allocated."""
    from .runtime.pools import pool_for_cache
    from .runtime.runtime import DecodeRuntime

    why = runtime_unavailable(model, method)
    if why is not None:
        raise ValueError(f"{method.name!r} cannot decode through the runtime: {why}")
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    request = make_cache(model, method, budget_tokens, 1, context, fill=True, device=device)
    live = kv_bytes(request) * batch
    pool = pool_for_cache(request, max_seqs=batch, max_new_tokens=warmup + steps * reps)
    rt = DecodeRuntime(model, pool, request.policy, request.evict_every, use_graph=cuda)
    slots = [rt.join(request) for _ in range(batch)]
    request = None
    ids = torch.randint(0, model.config.vocab_size, (batch,), device=device)  # [B]
    per_step, _ = greedy_decode(model, None, ids, steps, warmup, reps, device,
                                step=lambda x: rt.step(slots, x).argmax(-1))  # [B] -> [B]
    res = {"method": method.name, "decoder": "runtime", "batch": batch, "context": context,
           "ms_per_step": 1e3 * per_step, "tokens_per_s": batch / per_step, "kv_bytes_start": live,
           "pool_bytes": pool.nbytes(), "graph": rt.use_graph, **_cuda_figures(model, live, per_step, device)}
    rt = pool = None  # released before free()
    free(device)
    return res


def or_oom(fn: Callable[[], dict[str, Any]], device: str = "cuda", **labels: Any) -> dict[str, Any]:
    """``fn()``, or ``{**labels, "oom": True}`` if it ran out of GPU memory; memory is released either way."""
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - only OOM is expected
        if not is_oom(err):
            raise
        result = {**labels, "oom": True}
    # outside the except block: the traceback (and the cache it holds) is gone, so the memory can be released
    free(device)
    return result


def fits(model: Any, method: BenchCache, batch: int, context: int, budget_tokens: int) -> bool:
    every = 1 if method.spec is None else method.spec.evict_every
    # long enough to reach an eviction: its gather briefly holds a layer twice
    result = or_oom(lambda: decode(model, method, batch, context, budget_tokens, steps=every + 2, warmup=1, reps=1))
    return not result.get("oom")


def max_batch(model: Any, method: BenchCache, context: int, budget_tokens: int, hi: int) -> int:
    """Largest batch whose cache and decode step fit: start from the estimate free memory / bytes per sequence,
    then bisect between a batch that fits and one that does not."""
    free()
    probe = make_cache(model, method, budget_tokens, 1, context, fill=True)
    per_seq = kv_bytes(probe)
    del probe
    free()
    estimate = max(1, min(hi, int(torch.cuda.mem_get_info()[0] / per_seq)))
    lo, b = 0, estimate
    while b > 1 and not fits(model, method, b, context, budget_tokens):
        b //= 2
    lo = b if fits(model, method, b, context, budget_tokens) else 0
    b = min(hi + 1, max(lo + 1, estimate + 1))
    while b <= hi and fits(model, method, b, context, budget_tokens):
        lo, b = b, b + max(1, b // 8)
    while b - lo > 1:  # lo fits, b does not
        mid = (lo + b) // 2
        if fits(model, method, mid, context, budget_tokens):
            lo = mid
        else:
            b = mid
    return lo


def run(args: argparse.Namespace) -> None:
    """Run the parts of the benchmark that ``args`` names and write the JSON report to ``args.out``."""
    device = getattr(args, "device", "cuda") or "cuda"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device {device!r} is not supported: 'cuda', or 'cpu' for a check of the decode part")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("squeezekv bench measures GPU throughput and needs a CUDA device; none is available here")
    config_path = Path(args.config)
    if not config_path.is_file():
        raise ValueError(f"benchmark config {args.config!r} does not exist")
    cfg = json.loads(config_path.read_text())
    # cuDNN's SDPA builds an execution plan per new shape; a growing cache has a new shape every step, which makes
    # eager decoding of growing caches look slower than it is in a warm server. Both sides turn it off.
    torch.backends.cuda.enable_cudnn_sdp(cfg.get("cudnn_sdpa", False))
    parts = set(args.only.split(",")) if args.only else {"prefill", "decode", "maxbatch"}
    if device == "cpu" and parts != {"decode"}:
        raise ValueError(f"on the CPU only the decode part runs (a check with a small model): pass --only decode, "
                         f"not {','.join(sorted(parts))}")
    if args.caches:
        cfg["caches"] = [c.strip() for c in args.caches.split(";") if c.strip()]
    if "caches" not in cfg:
        raise ValueError(f"benchmark config {args.config!r} has no 'caches' list ('full' or cache specs)")
    entries = [BenchCache.parse(c) for c in cfg["caches"]]
    if args.batches:
        cfg["batches"] = [int(b) for b in args.batches.split(",")]
    if args.prefill_contexts:
        cfg["prefill_contexts"] = [int(c) for c in args.prefill_contexts.split(",")]
    if args.decode_steps:
        cfg["decode_steps"] = args.decode_steps
    if getattr(args, "no_runtime", False):
        cfg["runtime"] = False
    if getattr(args, "no_eager_reference", False):
        cfg["eager_reference"] = False
    cfg.setdefault("runtime", True)
    cfg.setdefault("eager_reference", True)
    for key in ("runtime", "eager_reference"):
        if not isinstance(cfg[key], bool):
            raise TypeError(f"benchmark config {key}={cfg[key]!r} must be true or false")
    if device == "cpu" and any(e.decoder == "graph" for e in entries):
        raise ValueError("decoder='graph' replays CUDA graphs: it needs --device cuda")
    model = build_model(cfg, device)
    report: dict[str, Any] = {
        "config": cfg, "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "torch": torch.__version__,
        "transformers": transformers.__version__, "squeezekv": squeezekv.__version__,
        "weight_bytes": weight_bytes(model), "prefill": [], "decode": [], "max_batch": {},
    }
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(report, indent=2))

    context, budget = cfg["context"], cfg["budget"]
    budget_tokens = int(round(budget * context))
    if "prefill" in parts:
        for ctx in cfg["prefill_contexts"]:
            for method in entries:
                if ctx > cfg.get("prefill_max_context", {}).get(method.name, 1 << 30):
                    continue
                chunks = [0] + ([int(c) for c in args.prefill_chunks.split(",")]
                                if getattr(args, "prefill_chunks", "") and method.spec is not None else [])
                for chunk in chunks:
                    r = or_oom(lambda: prefill(model, method, ctx, budget, cfg["reps"], chunk), method=method.name,
                               context=ctx, prefill_chunk=chunk)
                    report["prefill"].append(r)
                    print("prefill", json.dumps({k: v for k, v in r.items() if k != "times"}), flush=True)
                    save()
    if "maxbatch" in parts:
        for method in entries:
            report["max_batch"][method.name] = max_batch(model, method, context, budget_tokens, cfg["max_batch_hi"])
            print("max_batch", method.name, report["max_batch"][method.name], flush=True)
            save()
    if "decode" in parts:
        for method in entries:
            batches = list(cfg["batches"])
            mb = report["max_batch"].get(method.name)
            if mb and mb not in batches:
                batches.append(mb)
            through_runtime = cfg["runtime"] and runtime_unavailable(model, method) is None
            reference = BenchCache(f"{method.name} decoder=eager", method.spec, "eager")
            for b in sorted(batches):
                if mb is not None and b > mb:
                    continue
                timing = (b, context, budget_tokens, cfg["decode_steps"], cfg["warmup"], cfg["reps"], device)
                if through_runtime:
                    rows = [or_oom(lambda: decode_runtime(model, method, *timing), device, method=method.name,
                                   decoder="runtime", batch=b)]
                    if cfg["eager_reference"]:
                        rows.append(or_oom(lambda: decode(model, reference, *timing), device, method=reference.name,
                                           decoder="eager", batch=b))
                else:
                    rows = [or_oom(lambda: decode(model, method, *timing), device, method=method.name,
                                   decoder=method.decoder, batch=b)]
                for r in rows:
                    report["decode"].append(r)
                    print("decode", json.dumps(r), flush=True)
                save()
    save()

