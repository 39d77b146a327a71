"""The main job (``squeezekv run``): one real prompt, full cache vs compressed cache, side by side.

Both runs use the same loops of :mod:`squeezekv.generation` (prefill, then greedy decoding one token per step), so
bytes and timings are comparable: KV bytes are read from the tensors each cache really holds after the prefill and at
the end; quality is the answer of each, whether it contains the needle's key fact, and the log-likelihood of a
reference continuation (teacher-forced token by token after the compressed prompt). The prompt is built by
:mod:`squeezekv.eval.tasks` (the needle task's pieces).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .eval.tasks import NEEDLES, chat_prompt, haystack, insert_needle, read_prompt_file
from .generation import greedy, prefill, stepwise_logprobs
from .plan import Budget
from .spec import CacheSpec


@dataclass
class RunConfig:
    """What ``squeezekv run`` measures: the full cache and the compressed ``cache`` at each budget of ``budgets``
    (``budget``: one budget instead, the spec's when the spec came with one)."""

    model: str | None = None
    cache: CacheSpec = field(default_factory=CacheSpec)
    budget: float | int | str | None = None  # one budget (a single compressed cell) instead of ``budgets``
    budgets: tuple[float | int | str, ...] = (0.5, 0.3, 0.2)
    prompt_file: str | None = None
    max_new_tokens: int = 24
    device: str = "cpu"
    dtype: str | None = None
    context_tokens: int = 1200
    depth: float = 0.5
    needle: int = 0

    def __post_init__(self) -> None:
        self.cache = CacheSpec.of(self.cache)

    def cell_specs(self) -> list[CacheSpec]:
        """The compressed cells: ``cache`` at each budget of :meth:`cell_budgets`."""
        return [self.cache.replace(budget=b) for b in self.cell_budgets()]

    def cell_budgets(self) -> tuple[float | int | str, ...]:
        """The budgets of the compressed cells: ``budget`` alone when given, else the ``budgets`` sweep."""
        return (self.budget,) if self.budget is not None else tuple(self.budgets)

    def validate(self) -> None:
        if not self.cell_budgets():
            raise ValueError("budgets=() is empty: give at least one budget")
        for b in self.cell_budgets():
            Budget.parse(b)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is out of range: must be an integer >= 1")
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth={self.depth!r} is out of range: must be in [0, 1]")
        if self.context_tokens < 64:
            raise ValueError(f"context_tokens={self.context_tokens!r} is out of range: must be >= 64")
        if not 0 <= self.needle < len(NEEDLES):
            raise ValueError(f"needle={self.needle!r} is out of range: 0..{len(NEEDLES) - 1}")
        if self.prompt_file is not None:
            read_prompt_file(self.prompt_file)
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} is not supported: choose float32, bfloat16 or float16")


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class _LayerProgress:
    """Advance a progress bar once per decoder layer during one forward pass (prefill of a long prompt)."""

    def __init__(self, model: Any, desc: str, enabled: bool):
        self.model, self.desc, self.enabled = model, desc, enabled

    def __enter__(self) -> "_LayerProgress":
        self.handles = []
        self.bar = None
        if not self.enabled:
            return self
        from tqdm.auto import tqdm

        from .models import decoder_layers

        layers = decoder_layers(self.model)
        self.bar = tqdm(total=len(layers), desc=self.desc, unit="layer", leave=False)
        for layer in layers:
            self.handles.append(layer.register_forward_hook(self._advance))
        return self

    def _advance(self, *_: Any) -> None:
        # a forward hook that returns anything but None replaces the layer's output: tqdm's update() returns True
        # whenever it redraws, so its result must not be returned
        self.bar.update(1)

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        if self.bar is not None:
            self.bar.close()


def _prefill(
    model: Any, prompt: list[int], cache: Any, device: str, progress: bool, desc: str, prefill_chunk: int | None,
) -> torch.Tensor:
    """:func:`squeezekv.generation.prefill` with a per-layer progress bar; the last position's logits ``[1, vocab]``."""
    with _LayerProgress(model, desc, progress):
        return prefill(model, prompt, cache, device, prefill_chunk)  # [1, vocab]


@torch.no_grad()
def measure(
    model: Any, prompt: list[int], reference: list[int], cache: Any, nbytes: Callable[[Any], int],
    max_new_tokens: int, eos: set[int], device: str, progress: bool, desc: str, prefill_chunk: int | None = None,
) -> dict[str, Any]:
    """One column of the table: prefill once, then (on a copy of the prefilled cache) the reference continuation's
    log-likelihood, teacher-forced one token per step, and (on the cache itself) greedy decoding."""
    t0 = time.perf_counter()
    logits = _prefill(model, prompt, cache, device, progress, desc, prefill_chunk)  # [1, vocab]
    _sync(device)
    prefill_s = time.perf_counter() - t0
    bytes_prefill = nbytes(cache)
    scored = copy.deepcopy(cache)
    loglik = 0.0
    for lp in stepwise_logprobs(model, scored, logits, reference, device):
        loglik += lp
    del scored
    t1 = time.perf_counter()
    out = greedy(model, cache, logits, max_new_tokens, eos, device, keep_eos=True)
    _sync(device)
    decode_s = time.perf_counter() - t1
    return {
        "tokens": out,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": len(prompt) / prefill_s,
        "decode_s": decode_s,
        "decode_tokens_per_s": len(out) / decode_s if decode_s > 0 else float("nan"),
        "kv_bytes_after_prefill": bytes_prefill,
        "kv_bytes_end": nbytes(cache),
        "reference_loglik": loglik,
        "reference_loglik_per_token": loglik / len(reference),
    }


def run(cfg: RunConfig, progress: bool = True, loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """The full cache and one compressed cache per budget of ``cfg`` on one prompt; a JSON-serialisable report.

    ``report["full"]`` is the full cache's column, ``report["compressed"]`` one column per budget (with its plan,
    per-layer bytes and tokens, and a ``summary`` relative to the full cache).
    ``loaded``: an already loaded ``(model, tokenizer)`` to reuse (``cfg.model``/``device``/``dtype`` are then
    ignored for loading)."""
    cfg.validate()
    from transformers import DynamicCache

    from . import dynamic_cache_nbytes, make_cache
    from .assets import load_model, read_essays
    from .models import arch_spec

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but CUDA is not available on this machine")
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    cfg.cache.validate()  # fail on bad names and parameters before loading anything

    t_load = time.perf_counter()
    model, tokenizer = loaded if loaded is not None else load_model(cfg.model, device=device, dtype=dtype)
    load_s = time.perf_counter() - t_load
    arch_spec(model.config)

    needle = NEEDLES[cfg.needle]
    if cfg.prompt_file:
        text = read_prompt_file(cfg.prompt_file)
        ids = tokenizer(text)["input_ids"]
        if len(ids) < 48:
            raise ValueError(f"prompt file has {len(ids)} tokens; give at least 48 (the last 16 are the reference)")
        prompt, reference = ids[:-16], ids[-16:]
        key = None
    else:
        context = insert_needle(haystack(tokenizer, cfg.context_tokens, read_essays()), needle.fact, cfg.depth)
        prompt = chat_prompt(tokenizer, context, needle.question)
        reference = tokenizer(needle.fact, add_special_tokens=False)["input_ids"]
        key = needle.key
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if limit and len(prompt) + max(cfg.max_new_tokens, len(reference)) > limit:
        raise ValueError(
            f"prompt of {len(prompt)} tokens + {cfg.max_new_tokens} new tokens is longer than the model's context "
            f"of {limit} tokens"
        )
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()

    def column(cache: Any, nbytes: Callable[[Any], int], desc: str, chunk: int | None) -> dict[str, Any]:
        res = measure(model, prompt, reference, cache, nbytes, cfg.max_new_tokens, eos, device, progress, desc,
                      chunk)
        res["answer"] = tokenizer.decode(res.pop("tokens"), skip_special_tokens=True).strip()
        res["found_needle"] = None if key is None else key.lower() in res["answer"].lower()
        return res

    full = column(DynamicCache(config=model.config), dynamic_cache_nbytes, "prefill (full cache)",
                  None)  # the full cache prefills in one pass
    cells = []
    for spec in cfg.cell_specs():
        cache = make_cache(model, spec)
        res = {"budget": spec.budget, "cache": spec.to_text(),
               **column(cache, lambda c: c.nbytes(), f"prefill ({spec.label()})", spec.prefill_chunk)}
        res["plan"] = cache.plan.as_dict()
        res["layer_bytes"] = cache.layer_nbytes()
        res["layer_tokens"] = cache.physical_lengths()
        res["kv_only_bytes_end"] = cache.kv_nbytes()
        res["summary"] = {
            "memory_saved_after_prefill": 1 - res["kv_bytes_after_prefill"] / full["kv_bytes_after_prefill"],
            "memory_ratio_after_prefill": res["kv_bytes_after_prefill"] / full["kv_bytes_after_prefill"],
            "same_answer": res["answer"] == full["answer"],
            "loglik_delta_per_token": res["reference_loglik_per_token"] - full["reference_loglik_per_token"],
            "decode_speed_ratio": res["decode_tokens_per_s"] / full["decode_tokens_per_s"],
        }
        cells.append(res)
    return {
        "config": {**asdict(cfg), "device": device, "dtype": str(next(model.parameters()).dtype)},
        "model": {"path": str(getattr(model, "name_or_path", "")), "type": model.config.model_type,
                  "layers": model.config.num_hidden_layers, "load_s": load_s},
        "prompt_tokens": len(prompt),
        "reference": tokenizer.decode(reference),
        "needle": None if key is None else asdict(needle),
        "full": full,
        "compressed": cells,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned first column, right-aligned others, two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header), *(fmt(r) for r in rows)]


def settings_line(cfg: dict[str, Any]) -> str:
    """The run header's line of channel, cross-layer and prefill settings (``cfg``: the report's config)."""

    def one(kind: str, name: str | None, params: dict[str, Any]) -> str:
        return f"{kind} none" if name is None else f"{kind} {name}{_params_text(params)}"

    spec = cfg.get("cache", cfg)
    prefill = spec.get("prefill_chunk")
    return "; ".join([one("channel", spec.get("channel"), spec.get("channel_params") or {}),
                      one("cross-layer", spec.get("crosslayer"), spec.get("crosslayer_params") or {}),
                      f"prefill in chunks of {prefill} tokens" if prefill else "one-pass prefill"])


def format_report(report: dict[str, Any]) -> str:
    """The table ``squeezekv run`` prints: one row for the full cache and one per compressed budget."""
    cfg, full, cells = report["config"], report["full"], report["compressed"]
    spec = cfg["cache"]
    needle = report["needle"]
    prompt = (f"prompt {report['prompt_tokens']} tokens" + (
        f" with a hidden fact at {100 * cfg['depth']:.0f}% depth (key {needle['key']!r})" if needle else ""))
    lines = [
        f"model {report['model']['type']} ({report['model']['layers']} layers) on {cfg['device']}, {cfg['dtype']}; "
        f"{prompt}",
        f"method {spec['method']}{_params_text(spec.get('method_params'))}, allocation {spec['allocation']}"
        f"{_params_text(spec.get('allocation_params'))}",
        settings_line(cfg),
        "",
    ]
    has_needle = needle is not None
    header = ["cache", "tokens/layer", "KV after prefill", "of full", "ref log-lik/token", "decode tok/s"]
    if has_needle:
        header.insert(4, "found fact")

    def row(name: str, res: dict[str, Any], tokens: str, share: str) -> list[str]:
        r = [name, tokens, _mib(res["kv_bytes_after_prefill"]), share, f"{res['reference_loglik_per_token']:.3f}",
             f"{res['decode_tokens_per_s']:.1f}"]
        if has_needle:
            r.insert(4, "yes" if res["found_needle"] else "no")
        return r

    rows = [row("full cache", full, str(report["prompt_tokens"]), "100%")]
    for c in cells:
        rows.append(row(f"{spec['method']} {c['budget']}", c, str(c["plan"]["base"]),
                        f"{100 * c['summary']['memory_ratio_after_prefill']:.1f}%"))
    lines += _table(header, rows)
    lines += ["", "answers:", f"  full cache: {full['answer']!r}"]
    lines += [f"  {spec['method']} {c['budget']}: {c['answer']!r}" for c in cells]
    shown = cells[-1]
    plan = shown["plan"]
    lines += [
        "",
        f"per-layer plan of {spec['method']} {shown['budget']} ({plan['allocation']}): total {plan['total']} tokens, "
        f"{plan['base']} per layer on average:",
        f"  {plan['budgets']}",
    ]
    if plan["allocation"] == "squeeze" and "shrunk_layers" in plan["details"]:
        lines.append(f"  squeeze: layers shrunk to p x base: {plan['details']['shrunk_layers']}")
    lines += [
        "",
        "KV bytes: read from the allocated tensors (bookkeeping included); 'of full': their share of the full "
        "cache's bytes;",
        "ref log-lik/token: log-likelihood per token of a reference continuation (higher is better); decode tok/s: "
        "on this machine.",
    ]
    return "\n".join(lines)


def _params_text(params: dict[str, Any] | None) -> str:
    return "" if not params else " (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
