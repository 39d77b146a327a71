"""The fused Coupled Quantization decode kernel alone (:func:`squeezekv.channel.coupled_triton.decode_state`) on random
CQ storage of one layer of the Llama-3.1-8B shape (8 KV heads, 4 query heads each, head dim 128, bf16), for a few
(tokens per block, warps, programs per multiprocessor, vector gathers, pipelining stages) configurations, next to the
PyTorch reference path of the same state (:meth:`QuantizedLayer._quantised_state`: codebook lookups one block at a
time + online softmax) and to SDPA over a bf16 cache of the same shape (what the full cache's attention of one layer
costs).

    python benchmarks/cq_kernel_sweep.py --out benchmarks/results/channel/gpu_cq            # CUDA, ~30 s
    python benchmarks/cq_kernel_sweep.py --out /tmp/cqs --device cpu --context 256 --batches 1  # check (interpreter)

Per configuration: ms per call (CUDA-synchronised, median of ``--reps`` timings of ``--calls`` calls each, after one
warm-up call) and the packed codes read per second; the first configuration's output is also compared with the
reference path's (max abs difference of ``acc / sum``). Writes ``cq_kernel_sweep.json`` with its config.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
if "--device" in sys.argv and "cpu" in sys.argv[sys.argv.index("--device") + 1:][:1]:  # interpreter before triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from squeezekv.bench import timed  # noqa: E402
from squeezekv.channel.packing import pack  # noqa: E402

#: (tokens per block, warps per program, programs per multiprocessor aimed at by the split count, vector gathers,
#: pipelining stages; 0: Triton's default)
CONFIGS = ((32, 4, 4, 1, 0), (32, 4, 4, 0, 0), (16, 4, 4, 1, 0), (64, 4, 4, 1, 0), (32, 4, 8, 1, 0), (32, 4, 4, 1, 1),
           (32, 4, 4, 1, 2), (32, 8, 2, 1, 0), (64, 8, 2, 1, 0), (64, 8, 1, 1, 0), (64, 8, 2, 1, 1))


def reference_state(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor,
                    scaling: float, width: int, dtype: torch.dtype, block: int = 1024) -> tuple[torch.Tensor, ...]:
    """The PyTorch reference path's state (same code as :meth:`QuantizedLayer._quantised_state` with CQ's
    ``_decode``) without building a cache: codebook lookups ``block`` tokens at a time + online softmax."""
    from squeezekv.channel.coupled import CoupledLayer
    from squeezekv.channel.quantized import QuantizedLayer

    layer = CoupledLayer.__new__(CoupledLayer)  # only the stateless helpers are used
    layer.c, layer.width, layer.dtype = kb.shape[-1], width, dtype
    qg = q[:, :, :, None]  # [B, H, G, 1, D]
    b, h, g, _, _ = qg.shape
    state = (qg.new_full((b, h, g, 1), float("-inf"), dtype=torch.float32),
             qg.new_zeros((b, h, g, 1), dtype=torch.float32),
             qg.new_zeros((b, h, g, 1, vb.shape[1] * vb.shape[3]), dtype=torch.float32))
    for s in range(0, kc.shape[2], block):
        k = layer._decode(kc[:, :, s:s + block], kb)
        v = layer._decode(vc[:, :, s:s + block], vb)
        state = QuantizedLayer._merge(layer, state, qg, k, v, None, scaling)
    return state


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--bits", default="2,1")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    if args.device == "cpu":
        args.calls, args.reps = 1, 1
    elif not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA device; pass --device cpu to check (Triton interpreter)")
    from squeezekv.channel import coupled_triton as ct

    dev, dtype = args.device, torch.bfloat16
    h, g, d, n = args.kv_heads, args.group, args.head_dim, args.context
    scaling = d ** -0.5
    report: dict[str, Any] = {"config": {**vars(args), "configs": CONFIGS, "dtype": "bfloat16"},
                              "device_name": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
                              "torch": torch.__version__, "results": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cq_kernel_sweep.json"

    def ms_of(fn: Any) -> float:
        fn()
        return 1e3 * statistics.median(timed(lambda: [fn() for _ in range(args.calls)], args.reps, dev)) / args.calls

    for b in [int(x) for x in args.batches.split(",")]:
        qf = torch.randn(b, h * g, 1, d, device=dev, dtype=dtype)
        kf = torch.randn(b, h, n, d, device=dev, dtype=dtype)
        vf = torch.randn_like(kf)
        sdpa = ms_of(lambda: torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, scale=scaling,
                                                                              enable_gqa=True))
        full_bytes = 2 * kf.numel() * kf.element_size()
        report["results"].append({"batch": b, "method": "sdpa_bf16", "ms": sdpa, "read_bytes": full_bytes,
                                  "GB_per_s": full_bytes / sdpa / 1e6})
        print(json.dumps(report["results"][-1]), flush=True)
        del kf, vf
        for bits in [int(x) for x in args.bits.split(",")]:
            c = 8 // bits
            k = 1 << (bits * c)
            gen = torch.Generator().manual_seed(bits)
            kb, vb = (t.to(dev) for t in torch.randn(2, h, d // c, k, c, generator=gen))
            kc = pack(torch.randint(0, k, (b, h, n, d // c), device=dev), 8)
            vc = torch.randint_like(kc, 0, 256)
            q = qf.view(b, h, g, d)
            books = (kb.to(dtype), vb.to(dtype))
            ref = reference_state(q, kc, vc, kb, vb, scaling, 8, dtype)
            row = {"batch": b, "bits": bits, "context": n, "code_bytes": 2 * kc.numel()}
            row["ms_torch"] = ms_of(lambda: reference_state(q, kc, vc, kb, vb, scaling, 8, dtype))
            for i, (block_n, warps, per_sm, vec, stages) in enumerate(CONFIGS):
                def call() -> tuple[torch.Tensor, ...]:
                    return ct.decode_state(q, kc, vc, *books, scaling, block_n=block_n, num_warps=warps,
                                           programs_per_sm=per_sm, vector=bool(vec), num_stages=stages or None)
                if i == 0:
                    m, s, acc = call()
                    row["max_abs_diff_vs_torch"] = (acc / s[..., None] - ref[2][..., 0, :] / ref[1]).abs().max().item()
                ms = ms_of(call)
                row[f"ms_fused_b{block_n}_w{warps}_p{per_sm}_v{vec}_s{stages}"] = ms
            fused = {key: v for key, v in row.items() if key.startswith("ms_fused")}
            row["best"] = min(fused, key=fused.get)
            row["ms_fused_best"] = fused[row["best"]]
            row["sdpa_bf16_ms"] = sdpa
            report["results"].append(row)
            print(json.dumps(row), flush=True)
            path.write_text(json.dumps(report, indent=2))
            del kc, vc
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
