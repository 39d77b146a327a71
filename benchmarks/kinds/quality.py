"""Quality kinds on a real model (the suite's ``pretrained`` model; the default SmolLM2-135M-Instruct): one quality
cell (the eval harness's examples, greedy generation and continuation log-likelihood, scorer), ``squeezekv run``'s
measurement for one (method, allocation), and the adjacent-layer K/V distance MiniCache relies on."""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Any

import torch
from transformers import DynamicCache

from squeezekv.spec import CacheSpec

from ..caches import all_bytes, is_full, kv_bytes, new_cache
from ..suite import Case
from . import REQUIRED, kind

#: TaskOptions fields given as lists in JSON, tuples in the dataclass
_TUPLES = ("needle_lengths", "needle_depths", "qa_placements", "ppl_sources")


def task_options(options: dict[str, Any]) -> Any:
    from squeezekv.eval.tasks import TaskOptions

    fields = set(TaskOptions.__dataclass_fields__)
    bad = sorted(set(options) - fields)
    if bad:
        raise ValueError(f"task options: unknown {bad}; TaskOptions takes {sorted(fields)}")
    return TaskOptions(**{k: tuple(v) if k in _TUPLES else v for k, v in options.items()})


def _check_quality(settings: dict[str, Any], where: str) -> None:
    from squeezekv.eval.tasks import TASKS

    bad = [t for t in settings["tasks"] if t not in TASKS]
    if bad:
        raise ValueError(f"{where}: unknown task(s) {bad}; choose from {sorted(TASKS)}")
    try:
        task_options(settings["options"]).validate()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def cache_stats(cache: Any, full_kv: int) -> dict[str, Any]:
    """Bytes held after the prefill (and what the cross-layer/channel methods report: merged pairs, retained
    fractions, ranks), against a full cache of the same prompt."""
    stats: dict[str, Any] = {"kv_bytes": kv_bytes(cache), "bytes": all_bytes(cache)}
    stats["kv_fraction_of_full"] = stats["kv_bytes"] / full_kv
    from squeezekv.crosslayer.minicache import MiniCacheLayer

    pairs = [la.pair for la in getattr(cache, "layers", []) if isinstance(la, MiniCacheLayer) and la.which == 0]
    if pairs:
        held = sum(p.merged_length for p in pairs) * pairs[0].keys.direction.shape[0] * pairs[0].keys.direction.shape[1]
        stats["merged_pairs"] = [list(p.layer_ids) for p in pairs]
        stats["retained_fraction_keys"] = sum(p.keys.retained_count() for p in pairs) / held
        stats["retained_fraction_values"] = sum(p.values.retained_count() for p in pairs) / held
    channel = getattr(cache, "channel", None)
    if channel is not None and hasattr(channel, "ranks"):
        stats["ranks"] = channel.ranks()
        stats["basis_bytes"] = channel.basis_nbytes()
    return stats


def _examples(ctx: Any, tasks: list[str], options: dict[str, Any]) -> list[Any]:
    key = ("examples", tuple(tasks), repr(sorted(options.items())))
    if key not in ctx.memo:
        from squeezekv.eval.data import Sources
        from squeezekv.eval.tasks import build_examples

        examples = build_examples(list(tasks), ctx.tokenizer, ctx.sources or Sources(), task_options(options))
        # perplexity first (one forward pass each), then the generation tasks
        ctx.memo[key] = [e for e in examples if e.task == "ppl"] + [e for e in examples if e.task != "ppl"]
    return ctx.memo[key]


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per cell: needle retrieval, QA F1/EM, mean NLL and perplexity (per source and overall), KV bytes per prompt
    token and the mean ratio to a full cache of the same prompt."""
    out: dict[str, Any] = {"n": len(rows)}
    for task, metric in (("needle", "retrieval"), ("qa", "f1"), ("qa", "em")):
        vals = [r["scores"][metric] for r in rows if r["task"] == task]
        if vals:
            out[f"{task}_{metric}"] = sum(vals) / len(vals)
            out[f"{task}_n"] = len(vals)
    ppl = [r for r in rows if r["task"] == "ppl"]
    for src in sorted({r["subset"] for r in ppl}):
        nll = [r["scores"]["nll"] for r in ppl if r["subset"] == src]
        out[f"nll_{src}"] = sum(nll) / len(nll)
        out[f"ppl_{src}"] = math.exp(out[f"nll_{src}"])
    if ppl:
        out["nll_all"] = sum(r["scores"]["nll"] for r in ppl) / len(ppl)
        out["ppl_all"] = math.exp(out["nll_all"])
    if rows:
        out["kv_bytes_per_prompt_token"] = sum(r["kv_bytes"] / r["prompt_tokens"] for r in rows) / len(rows)
        out["kv_fraction_of_full"] = sum(r["kv_fraction_of_full"] for r in rows) / len(rows)
        for key in ("retained_fraction_keys", "retained_fraction_values", "ranks", "merged_pairs"):
            if key in rows[0]:
                out[key] = rows[0][key] if key in ("ranks", "merged_pairs") else (
                    sum(r[key] for r in rows) / len(rows))
    return out


@kind("quality", {"cache": REQUIRED, "tasks": ["needle", "ppl"], "options": {}, "prefill_chunk": None,
                  "baseline": None}, check=_check_quality)
def quality(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """One quality cell: every example of ``tasks`` (sizes from ``options``, squeezekv.eval.TaskOptions fields)
    answered or scored with the case's cache; per-example records go to the suite's records file, the cell's
    summary to its JSON."""
    from squeezekv.eval.grid import continuation_nll, generate, score

    model, tok, device = ctx.model, ctx.tokenizer, ctx.device
    spec = case.get("cache")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    full_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()

    def factory() -> Any:
        return DynamicCache(config=model.config) if is_full(spec) else new_cache(model, spec)

    rows = []
    t_cell = time.perf_counter()
    for ex in _examples(ctx, case.get("tasks"), case.get("options")):
        held = lambda c, n=len(ex.prompt): cache_stats(c, full_per_token * n)  # noqa: B008 (binds this example's length)
        t0 = time.perf_counter()
        answer = nll = None
        if ex.kind == "generate":
            toks, stats = generate(model, list(ex.prompt), factory, held, ex.max_new_tokens, eos, device,
                                   case.get("prefill_chunk"))
            answer = tok.decode(toks, skip_special_tokens=True).strip()
        else:
            nll, stats = continuation_nll(model, list(ex.prompt), list(ex.continuation), factory, held, device,
                                          case.get("prefill_chunk"))
        rec = {"case": case.name, "task": ex.task, "subset": ex.subset, "example_id": ex.id, "meta": ex.meta,
               "prompt_tokens": len(ex.prompt), "answer": answer, "scores": score(ex, answer, nll), **stats,
               "seconds": time.perf_counter() - t0}
        ctx.record(rec)
        rows.append(rec)
    summary = {**summarise(rows), "seconds": time.perf_counter() - t_cell}
    ctx.progress(case, summary)
    return [summary]


@kind("run_cell", {"cache": REQUIRED, "context_tokens": 1200,
                   "depth": 0.5, "max_new_tokens": 24, "baseline": None})
def run_cell(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """``squeezekv run``'s measurement (needle answer, reference log-likelihood, KV bytes, full cache beside the
    compressed one) for one compressed ``cache`` (a CacheSpec), on the suite's model loaded once."""
    from squeezekv.runner import RunConfig, run

    spec = CacheSpec.from_dict(case.get("cache"))
    cfg = RunConfig(cache=spec, budget=spec.budget,
                    device=ctx.device, context_tokens=case.get("context_tokens"), depth=case.get("depth"),
                    max_new_tokens=case.get("max_new_tokens"))
    report = run(cfg, progress=False, loaded=(ctx.model, ctx.tokenizer))
    full = report["full"]
    rows = []
    for comp in report["compressed"]:
        row = {"budget": comp["budget"], "prompt_tokens": report["prompt_tokens"], "reference": report["reference"],
               "full_kv_bytes": full["kv_bytes_after_prefill"], "compressed_kv_bytes": comp["kv_bytes_after_prefill"],
               "compressed_kv_only_bytes_end": comp["kv_only_bytes_end"],
               "full_found_needle": full["found_needle"], "found_needle": comp["found_needle"],
               "full_answer": full["answer"], "answer": comp["answer"], "full_loglik": full["reference_loglik"],
               "loglik": comp["reference_loglik"], "plan": comp["plan"], **comp["summary"]}
        rows.append(row)
        ctx.progress(case, row)
    return rows


@kind("adjacent_distance", {"source": "linux-doc", "chars": 6000, "tokens": 512, "exclude_examples_of": None,
                            "baseline": None})
def adjacent_distance(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """Quantiles of the angular distance (arccos(cos) / pi) between the K/V of adjacent layers, per KV head and
    token, on a calibration document (> 20,000 characters, shuffled with seed "calibration") that the quality
    cases named by ``exclude_examples_of`` do not read."""
    from squeezekv.crosslayer.minicache import angular_distance
    from squeezekv.eval.data import Sources

    model, tok = ctx.model, ctx.tokenizer
    used: set[Any] = set()
    other = case.get("exclude_examples_of")
    if other:
        oc = ctx.case(other)
        used = {e.meta.get("doc") for e in _examples(ctx, oc.get("tasks"), oc.get("options"))}
    sources = ctx.sources or Sources()
    docs = list(sources.get_docs(case.get("source")))
    random.Random("calibration").shuffle(docs)
    name, text = next((n, t) for n, t in docs if n not in used and len(t) > 20000)
    ids = list(tok(text[:case.get("chars")], add_special_tokens=False)["input_ids"])[:case.get("tokens")]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([ids], device=ctx.device), cache=cache)
    q = torch.tensor([0.05, 0.5, 0.95])
    rows = []
    for layer in range(len(cache.layers) - 1):
        row: dict[str, Any] = {"layers": [layer, layer + 1], "doc": name, "tokens": len(ids)}
        for which in ("keys", "values"):
            d = angular_distance(getattr(cache.layers[layer], which), getattr(cache.layers[layer + 1], which)).cpu()
            row[which] = {"q05": d.quantile(q[0]).item(), "median": d.quantile(q[1]).item(),
                          "q95": d.quantile(q[2]).item(), "mean_cos": torch.cos(d * torch.pi).mean().item()}
        rows.append(row)
    ctx.progress(case, {"layers": len(rows), "median_key_distance": statistics.median(r["keys"]["median"]
                                                                                      for r in rows)})
    return rows
