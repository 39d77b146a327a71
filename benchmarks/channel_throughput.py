"""GPU decode throughput and max batch of KIVI 2-bit storage, alone and with eviction, vs the full cache, on a
randomly initialised Llama-3.1-8B-shaped model in bf16 (weights do not matter for speed or memory).

    python benchmarks/channel_throughput.py --out benchmarks/results/channel/gpu        # CUDA, ~3 min
    python benchmarks/channel_throughput.py --config benchmarks/tiny_config.json --device cpu --out /tmp/ch  # check
    # issue 8 (one GPU call, < 4 min: check, kernel sweep, decode): bash benchmarks/device_run.sh session8
    # the fused Triton kernel vs the PyTorch reference path:
    python benchmarks/channel_throughput.py --out benchmarks/results/channel/gpu_fused --batches 1,16,64 --only decode
    python benchmarks/channel_throughput.py --out benchmarks/results/channel/gpu_fused_maxbatch --only maxbatch \
        --methods full,kivi2-fused,snapkv0.3+kivi2-fused,kivi4-fused

Methods (each figure next to the full cache's from the same run):

* ``full``: transformers' ``DynamicCache`` holding ``context`` tokens;
* ``kivi2``: KIVI 2-bit (group 32, residual 128), nothing evicted, PyTorch reference attention (``kernel="torch"``);
* ``kivi2-fused``: the same storage, decoded with the fused Triton kernel (``kernel="triton"``,
  :mod:`squeezekv.channel.kivi_triton`);
* ``kivi4-fused``: KIVI 4-bit with the fused kernel;
* ``kivi2-fused-1launch``: ``kivi2-fused`` with the kernel's one-launch mode (``kivi_triton.ONE_LAUNCH``);
* ``snapkv0.3``: SnapKV keeping 30% of the context (eviction alone);
* ``snapkv0.3+kivi2``/``snapkv0.3+kivi2-fused``: the same survivors stored with KIVI 2-bit (reference path / kernel);
* ``cq2``/``cq1``: Coupled Quantization at 2 / 1 bits per channel (4 / 8 channels share one 8-bit code; no
  full-precision residual), nothing evicted, PyTorch reference attention; ``cq2-fused``/``cq1-fused``: the same storage
  decoded with the fused Triton kernel (:mod:`squeezekv.channel.coupled_triton`); ``snapkv0.3+cq2``/
  ``snapkv0.3+cq2-fused``: SnapKV's 30% stored with CQ 2-bit. The codebooks are random centroids of the model's shape
  (speed and memory do not depend on their values; they are shared by all sequences and not counted in the cache's
  bytes), written to a temporary calibration file and loaded by the method; the cache is filled through the layer's
  own ``flush`` (nearest-centroid codes of the random keys/values).

    # CQ (GPU, one call, ~3 min):
    python benchmarks/channel_throughput.py --out benchmarks/results/channel/gpu_cq --no-check --batches 1,16,64 \
        --steps 8 --max-probes 3 --methods full,cq2,cq2-fused,cq1-fused,snapkv0.3+cq2-fused

``--methods a,b,c`` picks methods (default: all). ``-fused`` methods need CUDA and triton; elsewhere they are
skipped (recorded with a ``skipped`` note). A GPU run starts with a correctness check on one layer of the model
(``check``): the fused attention output vs the reference path's, for 2 and 4 bits, with and without per-token group
ids (after a random eviction of quantised tokens), max abs difference recorded; it also times one layer's attention
over the quantised cache three ways (``check[..]["ms_torch"]``: reference path; ``["ms_fused"]``: quantised part
and residual in the kernels; ``["ms_fused_state_torch_residual"]``: the kernel's state + the residual merged in
PyTorch, the path before the residual was fused), and the kernels alone on random 2- and 4-bit storage of the
model's shape at batches 1, 16 and 64 for every split-kernel variant and a few block sizes / warp counts / split
heuristics (``kernel_sweep``: ms per call and GB/s of packed codes, scales and zeros read, for the quantised state
alone and for the fused output in two launches or one; ``config_auto`` marks the defaults' choice).
``--kernel-variant``, ``--kernel-block-n``, ``--kernel-warps``, ``--programs-per-sm`` and ``--one-launch`` set the
kernel's defaults for the decode runs (recorded under ``kernel_defaults``).

The caches are filled directly with random keys/values of the right shapes, as they stand right after the prompt's
compression (KIVI layers quantise what they hold through their own ``flush``, chunk by chunk), then ``steps`` greedy
decode steps are timed (CUDA-synchronised, after ``warmup`` steps, median of ``reps`` repetitions). Max batch:
start from free memory / measured bytes per sequence, halve until a batch fits (cache filled and ``probe_steps``
decode steps run), then bisect up to ``--max-probes`` tries; out-of-memory errors are caught and memory released.
``kivi2``/``snapkv0.3+kivi2`` measure squeezekv's PyTorch reference attention (dequantise one block at a time +
online softmax); the ``-fused`` methods the Triton kernel (packed codes read once, dequantised in registers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import transformers  # noqa: E402

import squeezekv  # noqa: E402
from squeezekv.bench import build_model, free, full_cache, greedy_decode, kv_bytes, or_oom, timed  # noqa: E402
from squeezekv.channel import coupled, quantized  # noqa: E402
from squeezekv.plan import BudgetPlan  # noqa: E402

KIVI2 = {"bits": 2, "group_size": 32, "residual": 128, "kernel": "torch"}
KIVI2_FUSED = {**KIVI2, "kernel": "triton"}
KIVI4_FUSED = {**KIVI2_FUSED, "bits": 4}
#: method -> (eviction policy or None, fraction of the context kept, channel params or None)
METHODS: dict[str, tuple[str | None, float, dict[str, Any] | None]] = {
    "full": (None, 1.0, None),
    "kivi2": ("none", 1.0, KIVI2),
    "kivi2-fused": ("none", 1.0, KIVI2_FUSED),
    "kivi4-fused": ("none", 1.0, KIVI4_FUSED),
    "kivi2-fused-1launch": ("none", 1.0, KIVI2_FUSED),  # the kernel's one-launch mode (kivi_triton.ONE_LAUNCH)
    "snapkv0.3": ("snapkv", 0.3, None),
    "snapkv0.3+kivi2": ("snapkv", 0.3, KIVI2),
    "snapkv0.3+kivi2-fused": ("snapkv", 0.3, KIVI2_FUSED),
}

# -- Coupled Quantization (channel "coupled"): random codebooks of the model's shape (speed and memory do not depend on
# the centroids), set through the method's API and loaded from a file by ``prepare``; no full-precision residual
CQ2 = {"bits": 2, "residual": 0, "kernel": "torch"}
CQ1 = {**CQ2, "bits": 1}
METHODS.update({
    "cq2": ("none", 1.0, CQ2),
    "cq1": ("none", 1.0, CQ1),
    "cq2-fused": ("none", 1.0, {**CQ2, "kernel": "triton"}),
    "cq1-fused": ("none", 1.0, {**CQ1, "kernel": "triton"}),
    "snapkv0.3+cq2": ("snapkv", 0.3, CQ2),
    "snapkv0.3+cq2-fused": ("snapkv", 0.3, {**CQ2, "kernel": "triton"}),
})
_CQ_FILES: dict[tuple[Any, ...], str] = {}
coupled.NEAREST_CHUNK = 4096  # fewer, larger nearest-centroid searches when the cache is filled (<= 1 GiB, fill only)
#: the fused CQ kernel's defaults, e.g. CQ_KERNEL=32,4,4,1,0 (tokens per block, warps, programs per multiprocessor,
#: vector gathers, pipelining stages or 0 for Triton's default; see benchmarks/cq_kernel_sweep.py)
CQ_KERNEL = __import__("os").environ.get("CQ_KERNEL", "")


def channel_of(model: Any, method: str) -> tuple[str | None, dict[str, Any] | None]:
    """Channel method name and parameters of ``method`` (CQ: with a file of random codebooks of the model's shape)."""
    channel = METHODS[method][2]
    if channel is None:
        return None, None
    if not method.split("+")[-1].startswith("cq"):
        return "kivi", channel
    import tempfile

    from squeezekv.channel.coupled import CoupledQuant

    cfg = model.config
    h, d, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    cq = CoupledQuant(bits=channel["bits"])
    key = (cq.bits, cq.coupled, h, d, layers)
    if key not in _CQ_FILES:
        k, c = 1 << (cq.bits * cq.coupled), cq.coupled
        gen = torch.Generator().manual_seed(0)
        cq.set_codebooks({i: tuple(torch.randn(2, h, d // c, k, c, generator=gen)) for i in range(layers)})
        _CQ_FILES[key] = str(Path(tempfile.mkdtemp(prefix="cq_books_")) / f"cq{cq.bits}.pt")
        cq.save(_CQ_FILES[key])
    if CQ_KERNEL and channel.get("kernel") == "triton":
        from squeezekv.channel import coupled_triton

        block_n, warps, per_sm, vector, stages = (int(x) for x in CQ_KERNEL.split(","))
        coupled_triton.BLOCK_N, coupled_triton.NUM_WARPS, coupled_triton.PROGRAMS_PER_SM = block_n, warps, per_sm
        coupled_triton.VECTOR, coupled_triton.NUM_STAGES = bool(vector), stages or None
    return "coupled", {**channel, "calibration": _CQ_FILES[key]}


def fused_unavailable(method: str, device: str) -> str | None:
    """Why a ``-fused`` method cannot run here (None if it can, or if it is not fused)."""
    channel = METHODS[method][2]
    if not channel or channel.get("kernel") != "triton":
        return None
    if not device.startswith("cuda"):
        return "the fused Triton kernel needs a CUDA device: skipped"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'squeezekv[gpu]'): skipped"
    return None


@torch.no_grad()
def check_fused(model: Any, device: str, context: int, batch: int = 4, reps: int = 20) -> dict[str, Any]:
    """Fused vs reference attention on layer 0 of a filled cache (one decoding query): max abs difference of the
    outputs, with and without group ids, and the time of one layer's attention each way."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    out: dict[str, Any] = {}
    for method in ("kivi2-fused", "kivi4-fused"):
        cache = make_cache(model, method, batch, context, device)
        layer = cache.layers[0]
        q = torch.randn(batch, cfg.num_attention_heads, 1, cfg.head_dim, device=device, dtype=dtype)
        scaling = cfg.head_dim ** -0.5
        for case in ("groups", "group_ids"):
            if case == "group_ids":  # keep a random 70% of the quantised tokens: per-token group ids appear
                n = layer.physical_length
                keep = int(0.7 * layer.nq)
                r = torch.rand(batch, layer.keys.shape[1], layer.nq, device=device)
                idx = r.argsort(-1)[..., :keep].sort(-1).values
                rest = torch.arange(layer.nq, n, device=device).expand(batch, layer.keys.shape[1], -1)
                layer.keep(torch.cat([idx, rest], dim=-1))
                assert layer.kgid is not None
            res: dict[str, Any] = {"nq": layer.nq}
            outs = {}
            # torch: reference path; triton: quantised part and residual in the kernels (KIVILayer.attend);
            # state: the kernel's state + the residual merged in PyTorch (QuantizedLayer.attend, the path before)
            for kernel, name in (("torch", "torch"), ("triton", "triton"), ("triton", "state")):
                layer.kernel = kernel
                fn = layer.attend if name != "state" else (lambda *a: quantized.QuantizedLayer.attend(layer, *a))
                outs[name] = fn(q, None, None, None, scaling).float()
                times = timed(lambda: [fn(q, None, None, None, scaling) for _ in range(reps)], 3, device)
                res[{"torch": "ms_torch", "triton": "ms_fused", "state": "ms_fused_state_torch_residual"}[name]] = (
                    1e3 * statistics.median(times) / reps)
            res["max_abs_diff"] = (outs["triton"] - outs["torch"]).abs().max().item()
            res["max_abs_diff_state_path"] = (outs["state"] - outs["torch"]).abs().max().item()
            res["residual"] = layer.residual_length
            res["max_abs_out"] = outs["torch"].abs().max().item()
            out[f"{method}/{case}"] = res
            print("check", method, case, json.dumps(res), flush=True)
        del cache
        free(device)
    return out
FILL_CHUNK = 512  # tokens written (and quantised) at a time per layer when filling






def make_cache(model: Any, method: str, batch: int, context: int, device: str) -> Any:
    """A cache as it stands right after a ``context``-token prompt (filled with random keys/values)."""
    cfg = model.config
    kv_heads, head_dim, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    dtype = next(model.parameters()).dtype
    policy, keep, channel = METHODS[method]
    if policy is None:
        return full_cache(model, batch, context, device)
    n = context if keep >= 1.0 else max(1, int(round(keep * context)))
    budget = n if keep < 1.0 else cfg.max_position_embeddings
    plan = BudgetPlan(budgets=(budget,) * layers, base=budget, allocation="uniform")
    channel_name, channel_params = channel_of(model, method)
    cache = squeezekv.make_cache(model, policy, budget, "uniform", plan=plan, channel=channel_name,
                                 channel_params=channel_params,
                                 method_params={"window": 64} if policy == "snapkv" else None)
    for layer in cache.layers:
        layer.lazy_initialization(*(torch.empty(batch, kv_heads, 0, head_dim, device=device, dtype=dtype),) * 2)
        layer.seen, layer.prefill_done, layer.compressed = context, True, keep < 1.0
        idx = torch.arange(context - n, context, device=device, dtype=torch.int32)
        layer.token_idx = idx.expand(batch, kv_heads, n).contiguous()
        if layer.scores is not None:
            layer.scores = torch.rand(batch, kv_heads, n, device=device)
        if channel is None:
            layer.keys = torch.randn(batch, kv_heads, n, head_dim, device=device, dtype=dtype)
            layer.values = torch.randn_like(layer.keys)
            continue
        layer.keys = layer.values = torch.empty(batch, kv_heads, 0, head_dim, device=device, dtype=dtype)
        for s in range(0, n, FILL_CHUNK):
            m = min(FILL_CHUNK, n - s)
            k = torch.randn(batch, kv_heads, m, head_dim, device=device, dtype=dtype)
            layer.keys = torch.cat([layer.keys, k], dim=2)
            layer.values = torch.cat([layer.values, torch.randn_like(k)], dim=2)
            layer.flush()  # quantises all but the newest residual..residual+group-1 tokens
    return cache


@torch.no_grad()
def decode(model: Any, method: str, batch: int, context: int, steps: int, warmup: int, reps: int,
           device: str) -> dict[str, Any]:
    if method.endswith("-1launch"):  # the one-launch mode for this run only
        from squeezekv.channel import kivi_triton

        saved, kivi_triton.ONE_LAUNCH = kivi_triton.ONE_LAUNCH, True
        try:
            return decode(model, method[:-len("-1launch")], batch, context, steps, warmup, reps, device) | {
                "method": method}
        finally:
            kivi_triton.ONE_LAUNCH = saved
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cache = make_cache(model, method, batch, context, device)
    live = kv_bytes(cache)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    per_step, times = greedy_decode(model, cache, ids, steps, warmup, reps, device)
    res = {"method": method, "batch": batch, "context": context, "ms_per_step": 1e3 * per_step,
           "tokens_per_s": batch / per_step, "times": times, "kv_bytes_start": live,
           "kv_bytes_per_seq": live / batch, "kv_bytes_end": kv_bytes(cache)}
    if device.startswith("cuda"):
        res["peak_allocated"] = torch.cuda.max_memory_allocated()
    del cache
    free(device)
    return res


def max_batch(model: Any, method: str, context: int, probe_steps: int, max_probes: int, hi: int,
              device: str) -> dict[str, Any]:
    """Largest batch found to fit within ``max_probes`` tries (``lo`` fits; ``hi`` is the smallest that did not, or
    None if none failed)."""
    free(device)
    probe = make_cache(model, method, 1, context, device)
    per_seq = kv_bytes(probe)
    del probe
    free(device)
    avail = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else 8 * 2**30
    estimate = max(1, min(hi, int(avail / per_seq)))
    tries: list[tuple[int, bool]] = []

    def fits(b: int) -> bool:
        r = or_oom(lambda: decode(model, method, b, context, probe_steps, 0, 1, device), device)
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
                b = max(1, b // 2)
                if tries[-1][0] == 1:
                    break
                continue
        if bad is not None and bad - lo <= max(1, lo // 64):
            break
        b = (lo + bad) // 2
    return {"method": method, "context": context, "max_batch": lo, "smallest_failing": bad,
            "kv_bytes_per_seq": per_seq, "estimate": estimate, "tries": tries}


#: (variant, tokens per block, warps, programs per multiprocessor) timed by ``kernel_sweep``
SWEEP_CONFIGS: tuple[tuple[str, int, int, int], ...] = (
    ("interleaved", 64, 4, 4), ("planes", 32, 4, 4), ("planes_fma", 32, 4, 4),  # the first of each: also 1 launch
    ("interleaved", 32, 4, 4), ("interleaved", 64, 8, 4), ("interleaved", 64, 4, 8),
    ("planes", 64, 4, 4), ("planes", 32, 2, 4), ("planes", 32, 4, 2), ("planes", 32, 4, 8),
    ("planes_fma", 16, 4, 4), ("planes_fma", 32, 8, 4),
)


@torch.no_grad()
def sweep_kernel(cfg: Any, device: str, context: int, batches: tuple[int, ...] = (1, 16, 64), reps: int = 50,
                 configs: tuple[tuple[str, int, int, int], ...] = SWEEP_CONFIGS, bits_list: tuple[int, ...] = (2, 4)
                 ) -> list[dict[str, Any]]:
    """The kernels alone on random storage of the model's shape (``context - 128`` quantised tokens, 2 and 4 bits,
    group 32): for each (variant, tokens per block, warps, programs per SM) of ``configs`` (4 bits: the first
    config of each variant only), ms per call of :func:`kivi_triton.decode_state` (split kernel + reduction) and of
    :func:`kivi_triton.decode_attend` (split kernel + finishing kernel over a 144-token bf16 residual; ``attend``: two
    launches, ``attend_1launch``: one, the last split program finishing; ``max_abs_diff_*`` against the first
    config's output on the same inputs), and the bytes
    the quantised part must read (codes, scales, zeros; ``GB_per_s``) per second; ``config_auto`` marks what
    the defaults pick."""
    from squeezekv.channel import kivi_triton as kt

    h, d, g = cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    dtype = getattr(torch, cfg.get("dtype", "bfloat16"))
    gs, nq, r = 32, max(32, (context - 128) // 32 * 32), 144
    out = []
    for bits in bits_list:
        todo = configs if bits == 2 else tuple({c[0]: c for c in reversed(configs)}.values())
        for b in batches:
            kc = torch.randint(0, 256, (b, h, nq, d * bits // 8), device=device, dtype=torch.uint8)
            vc = torch.randint_like(kc, 0, 256)
            ks = torch.rand(b, h, nq // gs, d, device=device, dtype=dtype)
            kz = torch.randn_like(ks)
            vs = torch.rand(b, h, nq, d // gs, device=device, dtype=dtype)
            vz = torch.randn_like(vs)
            q = torch.randn(b, h, g, d, device=device, dtype=dtype)
            rk = torch.randn(b, h, r, d, device=device, dtype=dtype)
            rv = torch.randn_like(rk)
            nbytes = sum(t.numel() * t.element_size() for t in (kc, vc, ks, kz, vs, vz))
            store = (q, kc, vc, ks, kz, vs, vz, None)
            auto = kt._launch_config(b, h, g, d, d, nq, bits, gs, False, dtype, q.device, None, None, None, None,
                                     None)
            ref = None
            for variant, block_n, warps, pps in todo:
                opts = dict(block_n=block_n, num_warps=warps, variant=variant, programs_per_sm=pps)
                splits = kt._launch_config(b, h, g, d, d, nq, bits, gs, False, dtype, q.device, None, block_n, warps,
                                           variant, pps)[1]
                r_ = {"bits": bits, "batch": b, "nq": nq, "variant": variant, "block_n": block_n, "num_warps": warps,
                      "programs_per_sm": pps, "splits": splits, "read_bytes": nbytes,
                      "config_auto": (variant == kt.choose_variant(d, d, bits, gs) and block_n == auto[3]["BLOCK_N"]
                                      and warps == auto[3]["num_warps"] and splits == auto[1]
                                      and pps == kt.PROGRAMS_PER_SM)}
                for name, call in (
                        ("state", lambda: kt.decode_state(*store, bits, gs, d ** -0.5, **opts)),
                        ("attend", lambda: kt.decode_attend(*store, rk, rv, bits, gs, d ** -0.5, one_launch=False,
                                                            **opts)),
                        ("attend_1launch", lambda: kt.decode_attend(*store, rk, rv, bits, gs, d ** -0.5,
                                                                    one_launch=True, **opts))):
                    if name == "attend_1launch" and next(c for c in todo if c[0] == variant) != (
                            variant, block_n, warps, pps):
                        continue  # one launch: the first config of each variant only
                    try:
                        call()
                        ms = 1e3 * statistics.median(timed(lambda: [call() for _ in range(reps)], 3, device)) / reps
                    except Exception as e:  # a config that does not compile: recorded, the sweep goes on
                        r_[f"error_{name}"] = f"{type(e).__name__}: {e}"[:300]
                        continue
                    r_[f"ms_{name}"] = ms
                    r_[f"GB_per_s_{name}"] = nbytes / ms / 1e6
                    if name != "state":  # against the first config's two-launch output (same inputs)
                        o = call().float()
                        ref = o if ref is None else ref
                        r_[f"max_abs_diff_{name}"] = (o - ref).abs().max().item()
                r_["ms"], r_["GB_per_s"] = r_.get("ms_state"), r_.get("GB_per_s_state")
                out.append(r_)
                print("sweep", json.dumps(r_), flush=True)
            del kc, vc, ks, kz, vs, vz, rk, rv
            free(device)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).with_name("throughput_config.json")),
                    help="model shape and dtype (the 8B shape by default)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    ap.add_argument("--no-check", action="store_true", help="skip the fused-vs-reference check of a GPU run")
    ap.add_argument("--kernel-block-n", type=int, default=None, help="tokens per block of the fused kernel")
    ap.add_argument("--kernel-warps", type=int, default=None, help="warps per program of the fused kernel")
    ap.add_argument("--kernel-variant", default=None, help="split-kernel variant of the fused kernel "
                    "(interleaved / planes / auto)")
    ap.add_argument("--programs-per-sm", type=int, default=None, help="split heuristic of the fused kernel")
    ap.add_argument("--one-launch", type=int, default=None, choices=(0, 1),
                    help="fused decoding in one kernel launch (1) or two (0)")
    ap.add_argument("--sweep-batches", default="1,16,64", help="batches of the kernel sweep")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--probe-steps", type=int, default=2)
    ap.add_argument("--max-probes", type=int, default=5)
    ap.add_argument("--max-batch-hi", type=int, default=1024)
    ap.add_argument("--block-elems", type=int, default=1 << 26,
                    help="elements of one dequantised K (or V) block in the reference attention")
    ap.add_argument("--only", default="decode,maxbatch")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA device; pass --device cpu (with a tiny --config) to check")
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {list(METHODS)}")
    quantized.BLOCK_ELEMS = args.block_elems
    cfg = json.loads(Path(args.config).read_text())
    torch.backends.cuda.enable_cudnn_sdp(False)
    model = build_model(cfg, args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "config": {**vars(args), "model": cfg["model"], "dtype": cfg["dtype"], "methods_spec": METHODS},
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "squeezekv": squeezekv.__version__,
        "decode": [], "max_batch": {}, "skipped": {},
    }
    path = out_dir / "channel_throughput.json"

    def save() -> None:
        path.write_text(json.dumps(report, indent=2, default=str))

    parts = set(args.only.split(","))
    t0 = time.perf_counter()
    for method in list(methods):
        why = fused_unavailable(method, args.device)
        if why is not None:
            report["skipped"][method] = why
            methods.remove(method)
            print(f"{method}: {why}", flush=True)
    if fused_unavailable("kivi2-fused", args.device) is None:
        from squeezekv.channel import kivi_triton

        kivi_triton.BLOCK_N = args.kernel_block_n or kivi_triton.BLOCK_N
        kivi_triton.NUM_WARPS = args.kernel_warps or kivi_triton.NUM_WARPS
        kivi_triton.BLOCK_N_PLANES = args.kernel_block_n or kivi_triton.BLOCK_N_PLANES
        kivi_triton.VARIANT = args.kernel_variant or kivi_triton.VARIANT
        kivi_triton.PROGRAMS_PER_SM = args.programs_per_sm or kivi_triton.PROGRAMS_PER_SM
        if args.one_launch is not None:
            kivi_triton.ONE_LAUNCH = bool(args.one_launch)
        cfgm = cfg["model"]
        report["kernel_defaults"] = {
            "block_n": kivi_triton.BLOCK_N, "block_n_planes": kivi_triton.BLOCK_N_PLANES,
            "num_warps": kivi_triton.NUM_WARPS, "variant": kivi_triton.VARIANT,
            "programs_per_sm": kivi_triton.PROGRAMS_PER_SM, "one_launch": kivi_triton.ONE_LAUNCH,
            "variant_used": {bits: kivi_triton.choose_variant(cfgm["head_dim"], cfgm["head_dim"], bits, 32)
                             for bits in (2, 4)}}
    if not args.no_check and fused_unavailable("kivi2-fused", args.device) is None:
        report["check"] = check_fused(model, args.device, min(args.context, 4096))
        save()
        report["kernel_sweep"] = sweep_kernel(cfg["model"] | {"dtype": cfg["dtype"]}, args.device, args.context,
                                              tuple(int(x) for x in args.sweep_batches.split(",")))
        save()
    if "decode" in parts:
        for b in [int(x) for x in args.batches.split(",")]:
            for method in methods:
                r = or_oom(lambda: decode(model, method, b, args.context, args.steps, args.warmup, args.reps,
                                          args.device), args.device, method=method, batch=b)
                report["decode"].append(r)
                print("decode", json.dumps({k: v for k, v in r.items() if k != "times"}), flush=True)
                save()
    if "maxbatch" in parts:
        for method in methods:
            r = max_batch(model, method, args.context, args.probe_steps, args.max_probes, args.max_batch_hi,
                          args.device)
            report["max_batch"][method] = r
            print("max_batch", json.dumps(r), flush=True)
            save()
    full = {r["batch"]: r for r in report["decode"] if r["method"] == "full" and not r.get("oom")}
    for r in report["decode"]:
        if not r.get("oom") and r["batch"] in full:
            r["tokens_per_s_vs_full"] = r["tokens_per_s"] / full[r["batch"]]["tokens_per_s"]
            r["kv_bytes_vs_full"] = r["kv_bytes_start"] / full[r["batch"]]["kv_bytes_start"]
    fb = report["max_batch"].get("full", {}).get("max_batch")
    for r in report["max_batch"].values():
        if fb:
            r["max_batch_vs_full"] = r["max_batch"] / fb
    report["wall_s"] = time.perf_counter() - t0
    save()
    print(f"wrote {path} in {report['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
