"""kvpress's side of the throughput comparison, run in kvpress's own environment (transformers < 5.3).

Same model config and seed as ``throughput.py``. For each press: a real prefill of one ``context``-token prompt through
the press checks what kvpress's compressed cache holds (a ``DynamicCache`` with ``(1 - compression_ratio) * context``
tokens per layer); then, since kvpress compresses only at prefill and decodes with transformers' plain
``DynamicCache``, decoding is timed from a cache of exactly that shape filled with random keys/values, at the batch
sizes given (the same procedure ``throughput.py`` uses for squeezekv).

    python benchmarks/kvpress_decode.py --config benchmarks/throughput_config.json --batches 64,128 --out kv.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import kvpress
import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--batches", default="64")
    ap.add_argument("--presses", default="SnapKVPress,StreamingLLMPress")
    ap.add_argument("--decode-steps", type=int, default=0, help="override the config's decode_steps")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = json.loads(Path(args.config).read_text())
    if args.decode_steps:
        cfg["decode_steps"] = args.decode_steps
    torch.backends.cuda.enable_cudnn_sdp(cfg.get("cudnn_sdpa", False))  # as in throughput.py
    config = LlamaConfig(**cfg["model"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(getattr(torch, cfg["dtype"])).eval()
    context, ratio = cfg["context"], 1.0 - cfg["budget"]
    report = {"config": cfg, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "kvpress": getattr(kvpress, "__version__", "0.5.5"),
              "results": []}
    kv_heads, head_dim, layers = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    for name in args.presses.split(","):
        press = getattr(kvpress, name)(compression_ratio=ratio)
        ids = torch.randint(0, config.vocab_size, (1, context), device="cuda")
        cache = DynamicCache()
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad(), press(model):
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t
        kept = cache.layers[0].keys.shape[-2]
        del cache
        for batch in [int(b) for b in args.batches.split(",")]:
            gc.collect()
            torch.cuda.empty_cache()
            try:
                cache = DynamicCache()
                for i in range(layers):
                    k = torch.randn(batch, kv_heads, kept, head_dim, device="cuda", dtype=model.dtype)
                    cache.update(k, torch.randn_like(k), i)
                tok = torch.randint(0, config.vocab_size, (batch, 1), device="cuda")
                pos = torch.full((batch, 1), context, device="cuda")

                def step() -> None:
                    nonlocal tok, pos
                    with torch.no_grad():
                        logits = model(input_ids=tok, past_key_values=cache, position_ids=pos, use_cache=True,
                                       logits_to_keep=1).logits
                    tok, pos = logits[:, -1:].argmax(-1), pos + 1

                for _ in range(cfg["warmup"]):
                    step()
                times = []
                for _ in range(cfg["reps"]):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    for _ in range(cfg["decode_steps"]):
                        step()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                per_step = statistics.median(times) / cfg["decode_steps"]
                r = {"press": name, "batch": batch, "kept_tokens_per_layer": kept, "prefill_s_batch1": prefill_s,
                     "ms_per_step": 1e3 * per_step, "tokens_per_s": batch / per_step}
            except torch.cuda.OutOfMemoryError:
                r = {"press": name, "batch": batch, "oom": True}
            cache = None
            print("kvpress", json.dumps(r), flush=True)
            report["results"].append(r)
            Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
