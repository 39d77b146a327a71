"""Throughput kinds: decode tokens/s, max batch, prefill time/peak memory, and kvpress's decoding (run in kvpress's
own environment). Timing: :func:`squeezekv.bench.greedy_decode` (device-synchronised, after warm-up, median of
``reps`` repetitions of ``steps`` greedy steps)."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

import squeezekv
from squeezekv.bench import free, greedy_decode, or_oom, timed, weight_bytes

from ..caches import all_bytes, filled_cache, is_full, kv_bytes, new_cache
from ..suite import Case
from . import REQUIRED, kind

#: datasheet HBM bandwidth by card (bytes/s), for the roofline fraction
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
#: modules whose settings a case's ``kernel`` may set for its own runs: {"quantized": {"BLOCK_ELEMS": 4096}, ...}
#: (the fused kernels' launch settings are not module settings: the cache's ``channel_params`` carry them as
#: ``"kernel_config": {"block_n": 32, ...}``, see squeezekv.channel.kernels.KiviKernelConfig / CoupledKernelConfig)
KERNEL_MODULES = ("quantized", "coupled")

TIMING = {"steps": 16, "warmup": 3, "reps": 3}


def _cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _check_kernel(settings: dict[str, Any], where: str) -> None:
    for mod, values in (settings.get("kernel") or {}).items():
        if mod not in KERNEL_MODULES:
            raise ValueError(f"{where}: kernel module {mod!r} unknown; choose from {list(KERNEL_MODULES)}")
        if not isinstance(values, dict):
            raise TypeError(f"{where}: kernel[{mod!r}] must be a dict of module settings, got {values!r}")


@contextlib.contextmanager
def kernel_settings(kernel: dict[str, dict[str, Any]] | None) -> Iterator[None]:
    """Set module-level kernel settings of ``squeezekv.channel.<module>`` for one case, restored afterwards."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for mod, values in (kernel or {}).items():
            m = importlib.import_module(f"squeezekv.channel.{mod}")
            for key, value in values.items():
                if not hasattr(m, key):
                    raise ValueError(f"kernel setting {mod}.{key} does not exist")
                saved.append((m, key, getattr(m, key)))
                setattr(m, key, value)
        yield
    finally:
        for m, key, value in reversed(saved):
            setattr(m, key, value)


def fused_unavailable(cache: dict[str, Any], device: str) -> str | None:
    """Why a cache with a fused Triton kernel cannot run here (None if it can, or if it uses none)."""
    if (cache.get("channel_params") or {}).get("kernel") != "triton":
        return None
    if not _cuda(device):
        return "the fused Triton kernel needs a CUDA device: skipped"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'squeezekv[gpu]'): skipped"
    return None


def hbm_bandwidth() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)


@torch.no_grad()
def decode_once(ctx: Any, cache_spec: dict[str, Any], batch: int, context: int, steps: int, warmup: int, reps: int,
                fill: str = "random", graph: bool = False) -> dict[str, Any]:
    """One decode measurement: the cache filled (``random``: directly, as right after the prompt's compression;
    ``prefill``: a real forward of ``context`` random tokens through it), then ``steps`` greedy steps timed."""
    model, device = ctx.model, ctx.device
    if _cuda(device):
        torch.cuda.reset_peak_memory_stats()
    res: dict[str, Any] = {"batch": batch, "context": context}
    if fill == "prefill":
        cache = new_cache(model, cache_spec)
        g = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)  # [B, T]
        if _cuda(device):
            torch.cuda.synchronize()
        t = time.perf_counter()
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits  # [B, 1, V]
        if _cuda(device):
            torch.cuda.synchronize()
        res["prefill_s"] = time.perf_counter() - t
        first = logits[:, -1:].argmax(-1)  # [B, 1]
        from squeezekv.crosslayer.minicache import MiniCacheLayer

        pairs = [la.pair for la in getattr(cache, "layers", []) if isinstance(la, MiniCacheLayer) and la.which == 0]
        if pairs:
            total = sum(p.merged_length for p in pairs) * batch * model.config.num_key_value_heads
            res["merged_pairs"] = len(pairs)
            res["retained_fraction"] = sum(p.keys.retained_count() + p.values.retained_count()
                                           for p in pairs) / (2 * total)
    else:
        cache = filled_cache(model, cache_spec, batch, context, device)
        first = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)  # [B, 1]
    live, live_all = kv_bytes(cache), all_bytes(cache)
    step = None
    decoder = None
    if graph:
        from squeezekv.graphs import GraphDecoder

        decoder = GraphDecoder(model, cache, chunk=cache_spec.get("evict_every", 1))
        step = lambda x: decoder.step(x).argmax(-1, keepdim=True)  # noqa: E731
    per_step, times = greedy_decode(model, cache, first, steps, warmup, reps, device, step=step)
    res |= {"ms_per_step": 1e3 * per_step, "tokens_per_s": batch / per_step, "times": times,
            "kv_bytes_start": live, "bytes_start": live_all, "kv_bytes_per_seq": live / batch,
            "kv_bytes_end": kv_bytes(cache)}
    if _cuda(device):
        res["peak_allocated"] = torch.cuda.max_memory_allocated()
        bw = hbm_bandwidth()
        if bw:
            res["roofline_fraction"] = (weight_bytes(model) + live_all) / bw / per_step
    cache = decoder = None  # released before free()
    free(device)
    return res


def _skip(ctx: Any, case: Case) -> list[dict[str, Any]] | None:
    why = fused_unavailable(case.get("cache"), ctx.device)
    if why is not None:
        print(f"{case.name}: {why}", flush=True)
        return [{"skipped": why}]
    if case.settings.get("graph") and not _cuda(ctx.device):
        return [{"skipped": "CUDA-graph decoding needs a CUDA device: skipped"}]
    return None


def batches_of(ctx: Any, case: Case) -> list[int]:
    """A decode case's batches, sorted, plus the max batch its ``at_max_batch_of`` case found (when it ran)."""
    batches = list(case.get("batches"))
    mb_case = case.get("at_max_batch_of")
    if mb_case:
        mb = next((r.get("max_batch") for r in ctx.rows_of(mb_case)), None)
        if mb and mb not in batches:
            batches.append(mb)
    return sorted(batches)


def _check_decode(settings: dict[str, Any], where: str) -> None:
    _check_kernel(settings, where)
    if settings["fill"] not in ("random", "prefill"):
        raise ValueError(f"{where}: fill={settings['fill']!r}; choose from ['random', 'prefill']")


@kind("decode", {"cache": REQUIRED, "batches": [1, 16, 64], "context": 4096, **TIMING, "fill": "random",
                 "graph": False, "kernel": None, "baseline": None, "at_max_batch_of": None},
      check=_check_decode)
def decode(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """Decode tokens/s and KV bytes at each batch (``at_max_batch_of``: also at the max batch a ``max_batch`` case
    of the suite found; out-of-memory recorded as ``oom``)."""
    skipped = _skip(ctx, case)
    if skipped:
        return skipped
    batches = batches_of(ctx, case)
    rows = []
    with kernel_settings(case.get("kernel")):
        for b in batches:
            r = or_oom(lambda: decode_once(ctx, case.get("cache"), b, case.get("context"), case.get("steps"),
                                           case.get("warmup"), case.get("reps"), case.get("fill"),
                                           case.get("graph")), ctx.device, batch=b)
            rows.append(r)
            ctx.progress(case, r)
    return rows


@kind("max_batch", {"cache": REQUIRED, "context": 4096, "probe_steps": 2, "max_probes": 8, "hi": 1024,
                    "kernel": None, "baseline": None}, check=_check_kernel)
def max_batch(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """Largest batch whose filled cache and ``probe_steps`` decode steps fit: start from free memory / bytes per
    sequence, halve until one fits, then grow by 1/8 and bisect, within ``max_probes`` tries (``max_batch`` fits;
    ``smallest_failing`` did not, None if none failed)."""
    skipped = _skip(ctx, case)
    if skipped:
        return skipped
    spec, context, device = case.get("cache"), case.get("context"), ctx.device
    hi, max_probes = case.get("hi"), case.get("max_probes")
    with kernel_settings(case.get("kernel")):
        free(device)
        probe = filled_cache(ctx.model, spec, 1, context, device)
        per_seq = kv_bytes(probe)
        del probe
        free(device)
        avail = torch.cuda.mem_get_info()[0] if _cuda(device) else 8 * 2**30
        estimate = max(1, min(hi, int(avail / per_seq)))
        tries: list[tuple[int, bool]] = []
        steps = max(case.get("probe_steps"), spec.get("evict_every", 1) + 2)  # reach an eviction: its gather

        def fits(b: int) -> bool:
            r = or_oom(lambda: decode_once(ctx, spec, b, context, steps, 0, 1), device)
            tries.append((b, not r.get("oom")))
            return not r.get("oom")

        lo, bad, b = 0, None, estimate
        while len(tries) < max_probes:
            if fits(b):
                lo = b
                if bad is None:
                    if b >= hi:
                        break
                    b = min(hi, b + max(1, b // 8))
                    continue
            else:
                bad = b
                if lo == 0:
                    if b == 1:
                        break
                    b = max(1, b // 2)
                    continue
            if bad is not None and bad - lo <= max(1, lo // 64):
                break
            b = (lo + bad) // 2
    row = {"context": context, "max_batch": lo, "smallest_failing": bad, "kv_bytes_per_seq": per_seq,
           "estimate": estimate, "tries": tries}
    ctx.progress(case, row)
    return [row]


@kind("prefill", {"cache": REQUIRED, "contexts": [2048, 8192], "chunks": [0], "reps": 3, "max_context": None,
                  "baseline": None})
def prefill(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """Prefill of one prompt (batch 1, real forward) per context, in one pass (chunk 0) or in chunks of ``chunks``
    tokens compressing after each (``squeezekv.chunked_prefill``): time, peak memory over the weights, KV bytes."""
    model, device = ctx.model, ctx.device
    rows = []
    for context in case.get("contexts"):
        if case.get("max_context") and context > case.get("max_context"):
            continue
        for chunk in case.get("chunks"):
            if chunk and is_full(case.get("cache")):
                continue

            @torch.no_grad()
            def run(context: int = context, chunk: int = chunk) -> dict[str, Any]:
                ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)  # [1, T]
                base = torch.cuda.memory_allocated() if _cuda(device) else 0
                holder: dict[str, Any] = {}

                def once() -> None:
                    holder.pop("cache", None)
                    free(device)
                    cache = new_cache(model, case.get("cache"))
                    if chunk:
                        squeezekv.chunked_prefill(model, ids, cache, chunk)
                    else:
                        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                    holder["cache"] = cache

                once()  # warm-up
                if _cuda(device):
                    torch.cuda.reset_peak_memory_stats()
                times = timed(once, case.get("reps"), device)
                res = {"context": context, "prefill_chunk": chunk, "prefill_s": statistics.median(times),
                       "times": times, "kv_bytes": kv_bytes(holder["cache"]), "bytes": all_bytes(holder["cache"])}
                if _cuda(device):
                    res["peak_bytes_over_weights"] = torch.cuda.max_memory_allocated() - base
                holder.clear()
                return res

            r = or_oom(run, device, context=context, prefill_chunk=chunk)
            rows.append(r)
            ctx.progress(case, r)
    return rows


KVPRESS_WORKER = Path(__file__).with_name("kvpress_worker.py")


@kind("kvpress_decode", {"press": REQUIRED, "budget": 0.2, "batches": [1, 16, 64], "context": 4096, **TIMING,
                         "python": None, "baseline": None}, needs_model=False)
def kvpress_decode(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """kvpress's side: run in kvpress's own environment (its transformers), the interpreter given by ``python``
    or ``$SQUEEZEKV_KVPRESS_PYTHON`` (skipped when neither is set). Same random model (shape, dtype, seed 0); a real
    prefill through the press checks what its cache keeps, then decoding of transformers' ``DynamicCache`` of that
    shape filled with random keys/values is timed, as the ``decode`` kind does."""
    python = case.get("python") or os.environ.get("SQUEEZEKV_KVPRESS_PYTHON")
    if not python:
        return [{"skipped": "no kvpress interpreter: set the case's 'python' or $SQUEEZEKV_KVPRESS_PYTHON"}]
    job = {"model": ctx.model_config(), "dtype": ctx.suite.model.get("dtype", "bfloat16"), "device": ctx.device,
           **{k: case.get(k) for k in ("press", "budget", "batches", "context", "steps", "warmup", "reps")}}
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "rows.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([python, str(KVPRESS_WORKER), str(job_path), str(out_path)], text=True,
                              stdout=sys.stdout, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not out_path.exists():
            return [{"error": f"kvpress worker exited {proc.returncode}"}]
        result = json.loads(out_path.read_text())
    ctx.extra_versions["kvpress_env"] = result["versions"]
    for r in result["rows"]:
        ctx.progress(case, r)
    return result["rows"]
