"""kvpress's side of the ``kvpress_decode`` case kind, run by the runner in kvpress's own environment (its
transformers < 5.3; squeezekv is not imported here).

    python kvpress_worker.py JOB.json ROWS.json

For the press: a real prefill of one ``context``-token prompt through it checks what kvpress's compressed cache
holds (a ``DynamicCache`` with ``(1 - compression_ratio) * context`` tokens per layer); then, since kvpress
compresses only at prefill and decodes with transformers' plain ``DynamicCache``, decoding is timed from a cache of
exactly that shape filled with random keys/values at each batch (the ``decode`` kind's procedure).
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import statistics
import sys
import time
from pathlib import Path

import kvpress
import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _dist_version(name: str) -> str:
    """The installed distribution's version (kvpress 0.5.5 has no ``__version__``)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    device = job["device"]
    if device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the runner: no per-shape cuDNN plans
    config = LlamaConfig(**job["model"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, job["dtype"])).eval()
    context = job["context"]
    press = getattr(kvpress, job["press"])(compression_ratio=1.0 - job["budget"])
    ids = torch.randint(0, config.vocab_size, (1, context), device=device)  # [1, T]
    cache = DynamicCache()
    _sync(device)
    t = time.perf_counter()
    with torch.no_grad(), press(model):
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill_s = time.perf_counter() - t
    kept = cache.layers[0].keys.shape[-2]
    del cache
    kv_heads, head_dim, layers = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    rows = []
    for batch in job["batches"]:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        try:
            cache = DynamicCache()
            for i in range(layers):
                k = torch.randn(batch, kv_heads, kept, head_dim, device=device, dtype=model.dtype)  # [B, H, n, D]
                cache.update(k, torch.randn_like(k), i)
            tok = torch.randint(0, config.vocab_size, (batch, 1), device=device)  # [B, 1]
            pos = torch.full((batch, 1), context, device=device)  # [B, 1]

            def step() -> None:
                nonlocal tok, pos
                with torch.no_grad():
                    logits = model(input_ids=tok, past_key_values=cache, position_ids=pos, use_cache=True,
                                   logits_to_keep=1).logits  # [B, 1, V]
                tok, pos = logits[:, -1:].argmax(-1), pos + 1

            for _ in range(job["warmup"]):
                step()
            times = []
            for _ in range(job["reps"]):
                _sync(device)
                t = time.perf_counter()
                for _ in range(job["steps"]):
                    step()
                _sync(device)
                times.append(time.perf_counter() - t)
            per_step = statistics.median(times) / job["steps"]
            r = {"batch": batch, "context": context, "kept_tokens_per_layer": kept, "prefill_s_batch1": prefill_s,
                 "ms_per_step": 1e3 * per_step, "tokens_per_s": batch / per_step, "times": times}
        except torch.cuda.OutOfMemoryError:
            r = {"batch": batch, "oom": True}
        cache = None
        rows.append(r)
        print("kvpress", json.dumps(r), flush=True)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress")}
    Path(out_path).write_text(json.dumps({"rows": rows, "versions": versions}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
