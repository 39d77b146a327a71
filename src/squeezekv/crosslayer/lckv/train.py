"""Training an LCKV model (Wu & Tu, ACL 2024, arXiv 2405.10637) or a standard baseline on token shards.

The model's forward already does the paper's parallel training (m = ``forward_passes`` iterations without gradient,
b = ``backward_passes`` with gradient, loss on the last). This module adds the loop: AdamW, linear warm-up then cosine
decay, gradient clipping, bf16 autocast on CUDA, a progress bar with tokens/s and loss, held-out perplexity,
checkpoints every ``save_every`` steps and at the end, and resumption from the last checkpoint (batches depend only on
``(seed, step)``, so a resumed run sees the same tokens as an uninterrupted one).

Initialisation: ``init="scratch"`` (random, sizes from the config) or ``init="default"``/a local Llama checkpoint
folder (weights copied by :func:`squeezekv.crosslayer.lckv.convert.from_llama`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ...lckv_config import TrainConfig
from .configuration import LCKVConfig, make_kv_sources
from .convert import from_llama
from .data import eval_windows, load_shard, prepare_shards, sample_batch
from .modeling import LCKVForCausalLM


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    table = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype not in table:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    return table[cfg.dtype]


def build_model(cfg: TrainConfig, vocab_size: int, eos_token_id: int) -> LCKVForCausalLM:
    """A fresh model for ``cfg`` (random or converted from a Llama checkpoint)."""
    if cfg.init == "scratch":
        config = LCKVConfig(
            kv_sources=make_kv_sources(cfg.num_layers, cfg.layout, cfg.warmup_layers),
            forward_passes=cfg.forward_passes, backward_passes=cfg.backward_passes,
            vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=max(cfg.seq_len, 4096),
            eos_token_id=eos_token_id, pad_token_id=0, tie_word_embeddings=False,
        )
        torch.manual_seed(cfg.seed)
        return LCKVForCausalLM(config)
    from transformers import AutoModelForCausalLM

    from ...assets import resolve_model

    llama = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.init), dtype=torch.float32)
    if llama.config.vocab_size < vocab_size:
        raise ValueError(f"checkpoint vocabulary {llama.config.vocab_size} < data vocabulary {vocab_size}: "
                         f"tokenise with the checkpoint's tokenizer")
    sources = make_kv_sources(llama.config.num_hidden_layers, cfg.layout, cfg.warmup_layers)
    return from_llama(llama, sources, cfg.forward_passes, cfg.backward_passes)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def perplexity(model: LCKVForCausalLM, windows: torch.Tensor, batch_size: int, amp: torch.dtype | None) -> float:
    """exp(mean next-token NLL) over held-out ``windows`` [w, T] (each window encoded as the model trains)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                                reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def _save(model: LCKVForCausalLM, opt: torch.optim.Optimizer, state: dict[str, Any], out: Path) -> None:
    ckpt = out / "checkpoint"
    partial = out / "checkpoint.partial"
    model.save_pretrained(partial)
    torch.save({"optimizer": opt.state_dict(), **state}, partial / "trainer_state.pt")
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    partial.rename(ckpt)


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (steps, tokens, tokens/s, final loss, held-out perplexity)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg, device)
    info = prepare_shards(cfg.data_dir, cfg.sources, cfg.tokenizer, max_chars=cfg.max_chars, progress=progress)
    train_tokens, val_tokens = load_shard(cfg.data_dir, "train"), load_shard(cfg.data_dir, "val")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    ckpt = out / "checkpoint"
    state: dict[str, Any] = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "loss": None}
    if (ckpt / "trainer_state.pt").exists():
        model = LCKVForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        saved = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    else:
        model, saved = build_model(cfg, info.vocab_size, info.eos_token_id), None
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    if saved is not None:
        opt.load_state_dict(saved.pop("optimizer"))
        state.update(saved)
    from tqdm.auto import tqdm

    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc=f"train {cfg.layout}", unit="step",
               disable=not progress)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    start = time.perf_counter() - state["elapsed_s"]
    while state["step"] < cfg.max_steps:
        if cfg.time_budget_s is not None and time.perf_counter() - start >= cfg.time_budget_s:
            break
        step = state["step"]
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x = sample_batch(train_tokens, cfg.batch_size, cfg.seq_len, step * cfg.grad_accum + micro, cfg.seed)
            x = x.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = model(x, labels=x, use_cache=False).loss / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += tokens_per_step
        state["loss"] = loss_sum
        state["elapsed_s"] = time.perf_counter() - start
        tps = state["tokens"] / max(state["elapsed_s"], 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:,.0f}")
        record: dict[str, Any] = {"step": state["step"], "loss": loss_sum, "lr": lr_at(cfg, step),
                                  "tokens": state["tokens"], "elapsed_s": round(state["elapsed_s"], 3)}
        if cfg.eval_every and state["step"] % cfg.eval_every == 0:
            record["val_ppl"] = perplexity(model, eval_windows(val_tokens, cfg.seq_len, cfg.eval_windows),
                                           cfg.batch_size, amp)
        log.write(json.dumps(record) + "\n")
        if state["step"] % cfg.save_every == 0:
            _save(model, opt, state, out)
    bar.close()
    _save(model, opt, state, out)
    val_ppl = perplexity(model, eval_windows(val_tokens, cfg.seq_len, cfg.eval_windows), cfg.batch_size, amp)
    summary = {"steps": state["step"], "tokens": state["tokens"], "train_time_s": state["elapsed_s"],
               "tokens_per_s": state["tokens"] / max(state["elapsed_s"], 1e-9), "final_loss": state["loss"],
               "val_ppl": val_ppl, "val_tokens_evaluated": min(info.val_tokens // cfg.seq_len, cfg.eval_windows)
               * cfg.seq_len, "kv_sources": model.config.kv_sources, "checkpoint": str(ckpt)}
    log.write(json.dumps({"summary": summary}) + "\n")
    log.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
