"""The ``lckv`` kind: small-scale reproduction of LCKV (Wu & Tu, "Layer-Condensed KV Cache for Efficient
Inference of Large Language Models", ACL 2024, arXiv 2405.10637): a standard Llama-style model and an LCKV model
of the same size trained from scratch on the same token batches, then compared on held-out perplexity, KV bytes per
token, the largest batch whose cache fits, prefill time and decode tokens/s. Moved from the former lckv_repro.py.

Phases (a case's ``phase``; ``all`` runs them in order; state lives in ``workdir``, default ``OUT/<case>``, so
phases can run in separate calls that carry it):

* ``prepare``: tokenise the offline sources into ``workdir/data`` (needs the tokenizer);
* ``calibrate``: time a few LCKV steps and set the step count so LCKV trains ``minutes`` (skipped with ``steps``);
* ``standard``, ``lckv``: train each model for the same steps (resumable);
* ``eval``: perplexity on the held-out shard, KV bytes/token, prefill time, decode tok/s, max batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from squeezekv.crosslayer.lckv import LCKVForCausalLM, make_kv_sources
from squeezekv.crosslayer.lckv.data import eval_windows, load_shard, prepare_shards
from squeezekv.crosslayer.lckv.measure import decode_throughput, kv_bytes_per_token, max_batch, prefill_time
from squeezekv.crosslayer.lckv.train import TrainConfig, autocast_dtype, perplexity, train

from ..suite import Case
from . import kind

#: training options shared by both models; "layout" is set per model
PRESETS: dict[str, dict[str, Any]] = {
    # ~110M parameters with SmolLM2's 49152-token vocabulary; the reference's LCKV layout (sandwich, 2 warm-up layers)
    "small": dict(sources=["linux-doc", "essays"], tokenizer="default", hidden_size=768, intermediate_size=2048,
                  num_layers=12, num_heads=12, num_kv_heads=4, seq_len=1024, batch_size=16, lr=6e-4,
                  warmup_steps=200, min_lr_ratio=0.1, eval_windows=256, save_every=100, warmup_layers=2,
                  forward_passes=7, backward_passes=2),
    "tiny": dict(sources=["essays"], tokenizer="bytes", max_chars=60000, hidden_size=32, intermediate_size=64,
                 num_layers=4, num_heads=2, num_kv_heads=1, seq_len=64, batch_size=4, lr=3e-3, warmup_steps=2,
                 eval_windows=4, save_every=2, warmup_layers=1, forward_passes=3, backward_passes=1),
}
#: inference measurement settings per preset
MEASURE: dict[str, dict[str, int]] = {
    "small": dict(context=4096, gen=32, decode_batch=32, cap=4096, prefill_batch=1),
    "tiny": dict(context=64, gen=4, decode_batch=2, cap=4, prefill_batch=1),
}
MODELS = {"standard": "standard", "lckv": "sandwich"}


def _results(out: Path) -> dict[str, Any]:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save(out: Path, results: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


def _cfg(args: argparse.Namespace, name: str, steps: int, **extra: Any) -> TrainConfig:
    opts = dict(PRESETS[args.preset])
    if args.config:
        opts.update(json.loads(Path(args.config).read_text()))
    opts.update(extra)
    opts["layout"] = MODELS.get(name, opts.get("layout", "sandwich"))
    return TrainConfig(out_dir=str(args.out / name), data_dir=str(args.out / "data"), max_steps=steps,
                       seed=args.seed, device=args.device, **opts)


def phase_prepare(args: argparse.Namespace, results: dict[str, Any]) -> None:
    cfg = _cfg(args, "standard", 1)
    info = prepare_shards(cfg.data_dir, cfg.sources, cfg.tokenizer, max_chars=cfg.max_chars)
    results["data"] = {"dir": str(info.path), "sources": info.sources, "tokenizer": info.tokenizer,
                       "vocab_size": info.vocab_size, "train_tokens": info.train_tokens,
                       "val_tokens": info.val_tokens}


def phase_calibrate(args: argparse.Namespace, results: dict[str, Any]) -> None:
    if args.steps:
        results["plan"] = {"steps": args.steps, "how": "--steps"}
        return
    probe = 12
    cfg = _cfg(args, "lckv", probe, warmup_steps=probe, save_every=10**9)
    cfg.out_dir = str(args.out / "calibrate")
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    train(cfg, progress=True)
    log = [json.loads(l) for l in (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines()]
    times = [r["elapsed_s"] for r in log if "step" in r]
    per_step = (times[-1] - times[3]) / (len(times) - 4)  # the first steps include compilation/allocator warm-up
    steps = max(1, int(args.minutes * 60 / per_step))
    results["plan"] = {"steps": steps, "lckv_step_s": per_step, "minutes": args.minutes,
                       "tokens": steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len, "how": "calibrated"}


def phase_train(args: argparse.Namespace, results: dict[str, Any], name: str) -> None:
    plan = results.get("plan")
    if plan is None:
        raise ValueError("run --phase calibrate (or pass --steps) first")
    # a generous wall-clock cap so a slow run still ends inside one device call; recorded if it bites
    cfg = _cfg(args, name, plan["steps"], time_budget_s=args.minutes * 60 * 1.15)
    summary = train(cfg, progress=True)
    summary["reached_planned_steps"] = summary["steps"] == plan["steps"]
    results.setdefault("train", {})[name] = summary


@torch.no_grad()
def phase_eval(args: argparse.Namespace, results: dict[str, Any]) -> None:
    m = MEASURE[args.preset]
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    val = load_shard(args.out / "data", "val")
    evals: dict[str, Any] = {}
    for name in MODELS:
        ckpt = args.out / name / "checkpoint"
        if not ckpt.exists():
            raise ValueError(f"no checkpoint at {ckpt}: run --phase {name} first")
        cfg = _cfg(args, name, 1)
        model = LCKVForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device).eval()
        windows = eval_windows(val, cfg.seq_len, cfg.eval_windows)
        row: dict[str, Any] = {"val_ppl": perplexity(model, windows, cfg.batch_size, autocast_dtype(cfg, device)),
                               "val_tokens": windows.numel(), "kv_sources": model.config.kv_sources}
        model = model.to(dtype)
        row["kv_bytes_per_token"] = kv_bytes_per_token(model)
        row["prefill_s"] = {"batch": m["prefill_batch"], "context": m["context"],
                            "seconds": prefill_time(model, m["prefill_batch"], m["context"])}
        row["decode"] = decode_throughput(model, m["decode_batch"], m["context"], m["gen"])
        mb = max_batch(model, m["context"], m["gen"], m["cap"])
        row["max_batch"] = mb
        batch = mb["max_batch"]
        while batch > 0:  # the search's largest batch can still miss by a fragment: back off 5% until it runs
            try:
                row["decode_at_max_batch"] = decode_throughput(model, batch, m["context"], m["gen"])
                break
            except torch.OutOfMemoryError:
                batch = int(batch * 0.95)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        evals[name] = row
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    s, l = evals["standard"], evals["lckv"]
    evals["lckv_vs_standard"] = {
        "ppl_ratio": l["val_ppl"] / s["val_ppl"],
        "kv_bytes_ratio": l["kv_bytes_per_token"]["measured"] / s["kv_bytes_per_token"]["measured"],
        "max_batch_ratio": l["max_batch"]["max_batch"] / max(1, s["max_batch"]["max_batch"]),
        "decode_tok_s_ratio_same_batch": l["decode"]["tokens_per_s"] / s["decode"]["tokens_per_s"],
        "decode_tok_s_ratio_max_batch": (l.get("decode_at_max_batch", {}).get("tokens_per_s", 0.0)
                                         / max(1e-9, s.get("decode_at_max_batch", {}).get("tokens_per_s", 1e-9))),
    }
    results["eval"] = evals
    results["machine"] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                          platform.processor() or "cpu", "torch": torch.__version__, "dtype": str(dtype),
                          "measure": m}


PHASES = ["prepare", "calibrate", "standard", "lckv", "eval"]


def _check(settings: dict[str, Any], where: str) -> None:
    if settings["preset"] not in PRESETS:
        raise ValueError(f"{where}: unknown preset {settings['preset']!r}; choose from {sorted(PRESETS)}")
    if settings["phase"] not in ["all", *PHASES]:
        raise ValueError(f"{where}: unknown phase {settings['phase']!r}; choose from {['all', *PHASES]}")


@kind("lckv", {"preset": "small", "phase": "all", "minutes": 8.0, "steps": None, "seed": 0, "config": None,
               "workdir": None, "baseline": None}, check=_check, needs_model=False)
def lckv(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """The LCKV reproduction's phases (see the module docstring); its results.json (merged over phases) is
    returned as the case's row and kept in ``workdir``."""
    a = case.settings
    out = Path(a["workdir"]) if a["workdir"] else ctx.out / case.name
    out.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(preset=a["preset"], config=a["config"], out=out, minutes=a["minutes"],
                              steps=a["steps"], seed=a["seed"], device=ctx.device)
    results = _results(out)
    results["preset"], results["paper"] = args.preset, "Wu & Tu, ACL 2024, arXiv 2405.10637"
    results["layouts"] = {name: make_kv_sources(PRESETS[args.preset]["num_layers"], layout,
                                                PRESETS[args.preset]["warmup_layers"])
                          for name, layout in MODELS.items()}
    for phase in PHASES if a["phase"] == "all" else [a["phase"]]:
        t = time.perf_counter()
        if phase == "prepare":
            phase_prepare(args, results)
        elif phase == "calibrate":
            phase_calibrate(args, results)
        elif phase in MODELS:
            phase_train(args, results, phase)
        else:
            phase_eval(args, results)
        results.setdefault("phase_seconds", {})[phase] = time.perf_counter() - t
        _save(out, results)
        ctx.progress(case, {"phase": phase, "seconds": time.perf_counter() - t})
    return [results]
