"""CPU-side cost of one KIVI decoding attention call with the fused kernel path, the Triton launches mocked (no GPU
needed): microseconds of Python per ``KIVILayer.attend`` call and the top-level PyTorch operations it issues (each
one a kernel launch on a GPU). Llama-like layer: 8 query / 2 KV heads, head dim 128, 2-bit KIVI (group 32, residual
128), 400-token prompt (256 quantised + 144 residual tokens), batch 1, float32 on CPU.

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/kivi_decode_overhead.py --out benchmarks/results/channel/cpu
    # the same script against another checkout's squeezekv (e.g. before the residual was fused):
    TRITON_INTERPRET=1 PYTHONPATH=/path/to/other/src python benchmarks/kivi_decode_overhead.py --out /tmp/x --label before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel path's device checks accept CPU tensors

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import squeezekv  # noqa: E402
from squeezekv.channel import kivi_triton as kt  # noqa: E402
from squeezekv.channel import triton_common  # noqa: E402


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *a, **k: None


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args(argv)
    for name in ("_split_kernel", "_finish_kernel", "_split_kernel_planes"):
        if hasattr(kt, name):
            setattr(kt, name, _NoLaunch())
    triton_common.merge_kernel = _NoLaunch()  # the split merge, shared with CQ's kernel
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).eval()
    cache = squeezekv.make_cache(model, "window", 4096, channel="kivi",
                                 channel_params={"bits": 2, "group_size": 32, "residual": 128, "kernel": "triton"})
    model(torch.randint(0, 64, (1, 400)), cache=cache)
    layer = cache.layers[0]
    q = torch.randn(1, 8, 1, 128)
    for _ in range(50):
        layer.attend(q, None, None, None, 128 ** -0.5)
    us = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(args.calls):
            layer.attend(q, None, None, None, 128 ** -0.5)
        us.append((time.perf_counter() - t) / args.calls * 1e6)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer.attend(q, None, None, None, 128 ** -0.5)
    top = [e.name for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    res = {"label": args.label, "nq": layer.nq, "residual": layer.residual_length, "us_per_call_median":
           statistics.median(us), "us_per_call_min": min(us), "us_runs": us, "top_level_aten_ops": len(top),
           "aten_ops": sorted(set(top)), "torch": torch.__version__,
           "note": "Triton launches mocked; on CPU the remaining PyTorch operations also compute (the residual merge "
                   "of a path that runs it in PyTorch costs CPU arithmetic here, not only launches)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kivi_decode_overhead_{args.label.replace(' ', '_')}.json"
    path.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "us_runs"}))


if __name__ == "__main__":
    main()
