"""Serving kinds: time to first token with KV reuse from each store tier vs recomputing the history, and the
multi-user multi-turn replay through squeezekv's serving engine (CachedAttention, arXiv 2403.19708)."""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from squeezekv.bench import free, full_cache
from squeezekv.generation import cache_kwargs
from squeezekv.spec import CacheSpec
from squeezekv.store import DiskTier, KVStore, LayerwiseLoad, MemoryTier, capture, namespace

from ..suite import Case
from . import kind


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def _prefill(model: Any, cache: Any, ids: list[int], device: str) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids], device=device), use_cache=True,
                 **cache_kwargs(model, cache)).logits[0, -1]  # [V]


@torch.no_grad()
def _recompute(model: Any, prompt: list[int], device: str) -> tuple[float, int, torch.Tensor]:
    _sync(device)
    t = time.perf_counter()
    logits = _prefill(model, DynamicCache(config=model.config), prompt, device)
    tok = int(logits.argmax())
    _sync(device)
    return time.perf_counter() - t, tok, logits


@torch.no_grad()
def _reuse(model: Any, store: KVStore, prompt: list[int], device: str) -> tuple[float, int, torch.Tensor, int]:
    _sync(device)
    t = time.perf_counter()
    snap = store.get(prompt)
    if snap is None:
        raise RuntimeError("the stored history was not found")
    with LayerwiseLoad(snap, model, device) as cache:
        logits = _prefill(model, cache, prompt[len(snap.tokens):], device)
    tok = int(logits.argmax())
    _sync(device)
    return time.perf_counter() - t, tok, logits, len(snap.tokens)


@kind("serving_replay", {"histories": [2048, 4096, 8192, 16384], "turns": 5, "turn_tokens": 64,
                         "tiers": ["gpu", "cpu", "disk"], "repeat": 5, "baseline": None})
def serving_replay(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """Per history length and turn: TTFT of recomputing the whole prompt vs reusing the previous turn's KV from
    each tier (store.get + layer-wise load + prefill of the new tokens); the first token and the logits of both are
    compared. Medians over ``repeat`` runs; histories beyond the model's context are skipped."""
    model, device = ctx.model, ctx.device
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    vocab = int(model.config.vocab_size)
    turns, turn_tokens, repeat = case.get("turns"), case.get("turn_tokens"), case.get("repeat")
    g = torch.Generator().manual_seed(0)
    rows = []
    for history in case.get("histories"):
        total = history + turns * turn_tokens
        if context and total > context:
            rows.append({"history": history, "skipped": f"{total} tokens exceed the context of {context}"})
            continue
        ids = torch.randint(100, vocab, (total,), generator=g).tolist()
        for turn in range(1, turns + 1):
            prompt = ids[: history + turn * turn_tokens]
            previous = prompt[:-turn_tokens]
            cache = DynamicCache(config=model.config)
            _prefill(model, cache, previous, device)
            snap = capture(cache, previous)
            recompute = [_recompute(model, prompt, device) for _ in range(repeat)]
            row: dict[str, Any] = {"history": history, "turn": turn, "prompt_tokens": len(prompt),
                                   "recompute_ttft_s": statistics.median(r[0] for r in recompute)}
            for tier in case.get("tiers"):
                if tier == "gpu" and not device.startswith("cuda"):
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    caps = {"gpu": 0, "cpu": 0, "disk": 0, tier: 1 << 40}
                    tiers: list[Any] = []
                    if device.startswith("cuda"):
                        tiers.append(MemoryTier("gpu", caps["gpu"], device))
                    tiers += [MemoryTier("cpu", caps["cpu"], "cpu"), DiskTier(Path(tmp), caps["disk"])]
                    times = []
                    for _ in range(repeat):
                        store = KVStore(tiers, namespace(bench=True), block=16)
                        store.put(snap)
                        dt, tok, logits, reused = _reuse(model, store, prompt, device)
                        times.append(dt)
                        store.close()
                        for t in tiers:
                            for key in list(t.sizes):
                                t.remove(key)
                    row[f"reuse_{tier}_ttft_s"] = statistics.median(times)
                    row[f"reuse_{tier}_same_first_token"] = tok == recompute[0][1]
                    row[f"reuse_{tier}_max_abs_logit_diff"] = float((logits.float() - recompute[0][2].float())
                                                                    .abs().max())
                    row["reused_tokens"] = reused
            rows.append(row)
            ctx.progress(case, row)
    return rows


class _Tokenizer:
    """What the engine needs of a tokenizer for token-id requests on a random model."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def _gib(x: float) -> int:
    return int(float(x) * (1 << 30))


@kind("serving_multiuser", {"cache": "full", "conversations": 64, "turns": 5, "history": 1024,
                            "turn_tokens": 64, "answer_tokens": 16, "max_active": 8, "gpu_gib": 2, "cpu_gib": 4,
                            "disk_gib": 8, "time_limit": 240, "runtime_slots": 0, "runtime_slot_tokens": 4096,
                            "runtime_compile": False, "prefill_chunk": None, "baseline": None, "compare": []})
def serving_multiuser(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """``conversations`` users each hold a ``turns``-turn conversation (closed loop: turn k+1 is submitted when
    turn k finished; its prompt is the history, the generated answer and a new ``turn_tokens``-token message)
    through ``squeezekv.serve.Engine`` with a three-tier KVStore of the given capacities. ``cache``: ``"full"`` or a
    CacheSpec (the server's compressed cache). Reports hits per tier, misses, prefill tokens saved and
    TTFT of turns >= 2 vs turn 1, and generated tokens/s end to end; every request's record goes to the records file.
    ``runtime_slots`` > 0: compressed requests decode on the decode runtime's pool of that many slots of
    ``runtime_slot_tokens`` entries per layer (``EngineConfig.runtime_slots``). ``prefill_chunk``: the full cache's
    prompts prefilled that many tokens per engine iteration (a compressed cache: its spec's ``prefill_chunk``)."""
    from squeezekv.serve.engine import Engine, EngineConfig, GenRequest

    model, device = ctx.model, ctx.device
    a = case.settings
    spec = None if a["cache"] == {"method": "full"} else CacheSpec.from_dict(a["cache"])
    method = None if spec is None else spec.method
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        tiers: list[Any] = []
        if device.startswith("cuda"):
            tiers.append(MemoryTier("gpu", _gib(a["gpu_gib"]), device))
        tiers += [MemoryTier("cpu", _gib(a["cpu_gib"]), "cpu"), DiskTier(tmp / (method or "full"), _gib(a["disk_gib"]))]
        store = KVStore(tiers, namespace(bench="multiuser", cache=None if spec is None else spec.to_text()), block=16)
        cfg = EngineConfig(cache=spec, device=device, max_active=a["max_active"],
                           max_queue=4 * a["conversations"], max_new_tokens=a["answer_tokens"],
                           runtime_slots=a["runtime_slots"], runtime_slot_tokens=a["runtime_slot_tokens"],
                           runtime_compile=a["runtime_compile"], prefill_chunk=a["prefill_chunk"])
        engine = Engine(model, _Tokenizer(), store, cfg).start()
        vocab = int(model.config.vocab_size)
        g = torch.Generator().manual_seed(0)
        histories = [torch.randint(100, vocab, (a["history"],), generator=g).tolist()
                     for _ in range(a["conversations"])]
        turns_left = {u: a["turns"] for u in range(a["conversations"])}
        records: list[dict[str, Any]] = []
        lock = threading.Condition()
        pending: list[tuple[int, list[int]]] = [(u, histories[u]) for u in range(a["conversations"])]

        def submit(user: int, prompt: list[int]) -> None:
            turn = a["turns"] - turns_left[user] + 1
            t0 = time.perf_counter()
            first: dict[str, float] = {}
            stamps: list[float] = []  # when each piece of text arrived

            def emit(ev: dict[str, Any]) -> None:
                if ev["type"] == "delta":
                    stamps.append(time.perf_counter())
                if ev["type"] == "delta" and "ttft" not in first:
                    first["ttft"] = time.perf_counter() - t0
                elif ev["type"] in ("done", "error"):
                    with lock:
                        if ev["type"] == "error":
                            records.append({"user": user, "turn": turn, "error": ev["message"]})
                        else:
                            usage = ev["usage"]
                            records.append({"user": user, "turn": turn, "prompt_tokens": usage["prompt_tokens"],
                                            "cached_tokens": usage["cached_tokens"], "ttft_s": first.get("ttft"),
                                            "completion_tokens": usage["completion_tokens"],
                                            "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])],
                                            "latency_s": time.perf_counter() - t0})
                            turns_left[user] -= 1
                            if turns_left[user] > 0:
                                new = torch.randint(100, vocab, (a["turn_tokens"],), generator=g).tolist()
                                pending.append((user, prompt + list(req.generated) + new))
                        lock.notify_all()

            req = GenRequest(prompt=prompt, max_tokens=a["answer_tokens"], emit=emit, user=f"user{user}")
            engine.submit(req)

        t_start = time.perf_counter()
        timed_out = False
        with lock:
            while any(turns_left.values()):
                while pending:
                    submit(*pending.pop(0))
                lock.wait(timeout=1.0)
                if time.perf_counter() - t_start > a["time_limit"]:
                    timed_out = True
                    break
        wall = time.perf_counter() - t_start
        counters = dict(engine.metrics.counters)
        phases, slowest = dict(engine.metrics.phases), engine.metrics.slowest()[:8]
        engine.shutdown()
        store.flush()
        stats = dict(store.stats)
        usage = store.usage()
        store.close()
    per_request = [sorted(r["gaps_s"]) for r in records if len(r.get("gaps_s", ())) >= 2]
    # each request's p99 time between tokens over its own median
    tbt_ratio = sorted(g[int(0.99 * (len(g) - 1))] / statistics.median(g) for g in per_request
                       if statistics.median(g) > 0)
    gaps = sorted(x for r in records for x in r.pop("gaps_s", []))  # time between streamed pieces, all requests
    for r in records:
        ctx.record({"case": case.name, **r})
    ok = [r for r in records if "error" not in r]
    if not ok and not timed_out:
        raise RuntimeError(f"every request failed: {records[:3]}")
    prompt_tokens = sum(r["prompt_tokens"] for r in ok)
    cached = sum(r["cached_tokens"] for r in ok)
    later = [r for r in ok if r["turn"] >= 2]
    lookups = sum(v for k, v in stats.items() if k.startswith("hit_") or k.startswith("miss"))
    hits = {k[4:]: v for k, v in stats.items() if k.startswith("hit_")}
    later_ttft = sorted(r["ttft_s"] for r in later if r["ttft_s"])
    first = [r["ttft_s"] for r in ok if r["turn"] == 1 and r["ttft_s"]]
    row = {
        "method": method or "full", "budget": None if spec is None else spec.budget,
        "cache": None if spec is None else spec.to_text(), "requests": len(records),
        "errors": sum(1 for r in records if "error" in r and r["error"] != "server shutting down"),
        "cut_at_time_limit": sum(1 for r in records if r.get("error") == "server shutting down"),
        "wall_s": wall, "time_limit_reached": timed_out,
        "lookups": lookups, "hits_per_tier": hits, "misses": stats.get("miss", 0) + stats.get("miss_evicted", 0),
        "hit_rate_per_tier": {k: v / lookups for k, v in hits.items()} if lookups else {},
        "turn2plus_requests": len(later),
        "turn2plus_hit_rate": sum(1 for r in later if r["cached_tokens"]) / len(later) if later else None,
        "prompt_tokens": prompt_tokens, "cached_prompt_tokens": cached,
        "prefill_tokens_saved_fraction": cached / prompt_tokens if prompt_tokens else None,
        "finished_requests": len(ok),
        "ttft_turn1_median_s": statistics.median(first) if first else None,
        "ttft_turn2plus_median_s": statistics.median(later_ttft) if later_ttft else None,
        "ttft_turn2plus_p99_s": later_ttft[int(0.99 * (len(later_ttft) - 1))] if later_ttft else None,
        "store_stats": stats, "tier_usage_at_end": usage,
        "generated_tokens": sum(r["completion_tokens"] for r in ok),
        "generated_tokens_per_s": sum(r["completion_tokens"] for r in ok) / wall,
        "runtime_slots": a["runtime_slots"],
        "runtime_decode_steps": counters.get("runtime_decode_steps", 0),
        "runtime_rows_per_step": (counters["runtime_decode_rows"] / counters["runtime_decode_steps"]
                                  if counters.get("runtime_decode_steps") else None),
        "runtime_fallback": counters.get("runtime_fallback_total", 0),
        "tbt_median_s": statistics.median(gaps) if gaps else None,
        "tbt_p99_s": gaps[int(0.99 * (len(gaps) - 1))] if gaps else None,
        "tbt_p99_over_median_per_request_median": statistics.median(tbt_ratio) if tbt_ratio else None,
        "tbt_p99_over_median_per_request_max": tbt_ratio[-1] if tbt_ratio else None,
        "runtime_mixed_steps": counters.get("runtime_mixed_steps", 0),
        # host seconds of the engine loop by phase, and the 8 slowest iterations' breakdowns (what the p99 gaps
        # between tokens were spent on)
        "engine_phase_s": phases, "slowest_iterations": slowest,
    }
    ctx.progress(case, row)
    return [row]


@kind("hf_generate_batch", {"conversations": 64, "history": 1024, "answer_tokens": 16, "baseline": None})
def hf_generate_batch(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """transformers' own continuous batching (``model.generate_batch``, paged full cache; an untimed short call
    first) on ``conversations`` prompts of ``history`` random tokens -- the first-turn prompts ``serving_multiuser``
    draws with the same seed -- generating ``answer_tokens`` each (greedy, no end-of-sequence token): generated
    tokens/s end to end, the baseline of the serving engine's figures."""
    from transformers import GenerationConfig

    import squeezekv

    model, a = ctx.model, case.settings
    squeezekv.detach(model)  # an earlier case's compressed cache switched the model to squeezekv's attention
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(100, vocab, (a["history"],), generator=g).tolist() for _ in range(a["conversations"])]
    config = GenerationConfig(max_new_tokens=a["answer_tokens"], min_new_tokens=a["answer_tokens"], do_sample=False,
                              eos_token_id=-1, pad_token_id=0)
    # a short untimed call first (its set-up and graph capture), then the timed one
    model.generate_batch(inputs[:2], generation_config=GenerationConfig(
        max_new_tokens=2, min_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=0))
    t0 = time.perf_counter()
    out = model.generate_batch(inputs, generation_config=config)
    wall = time.perf_counter() - t0
    done = [o for o in out.values() if not getattr(o, "error", None)]
    generated = sum(len(o.generated_tokens) for o in done)
    row = {"engine": "transformers generate_batch", "requests": len(inputs), "errors": len(inputs) - len(done),
           "wall_s": wall, "generated_tokens": generated, "generated_tokens_per_s": generated / wall}
    ctx.progress(case, row)
    return [row]


@kind("serving_capacity", {"cache": "full", "history": 8192, "answer_tokens": 128, "runtime_slot_tokens": None,
                           "slots": "auto", "reserve_gib": 4.0, "runtime_compile": False, "max_active": 64,
                           "time_limit": 240, "poll_s": 0.005, "baseline": None, "compare": []})
def serving_capacity(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """Where memory decides (issue 20, workload B): ``squeezekv.serve.Engine`` with the decode runtime's pool sized
    by free memory (``slots="auto"``: ``runtime_slots="auto"``, less ``reserve_gib``; or a number, for a check on
    the CPU), one-turn chats of ``history``-token prompts
    whose KV is placed directly (random keys/values of the right shape, ``GenRequest.prefilled``: the engine feeds
    only the last prompt token), ``answer_tokens`` each, as many chats as the pool admits. Reports the conversations
    held at once (``max_batch``: the pool's slots, every one taken), the slot and pool bytes, and the steady-state
    decode: generated tokens/s over the steps in which every slot decoded (the engine's step counters sampled every
    ``poll_s``). ``runtime_slot_tokens`` (default: the history or the compressed budget, plus the answer) sizes a
    slot's layers."""
    from squeezekv.serve.engine import Engine, EngineConfig, GenRequest

    from ..caches import cache_spec, filled_cache, is_full
    from ..suite import budget_tokens

    model, device, a = ctx.model, ctx.device, case.settings
    hist, answer = a["history"], a["answer_tokens"]
    full = is_full(a["cache"])
    cache = dict(a["cache"])
    if not full and cache["method"] == "snapkv":  # the window filled_cache gives SnapKV, so the policies agree
        cache["method_params"] = {"window": min(64, budget_tokens(cache, hist - 1)), **cache.get("method_params", {})}
    spec = None if full else cache_spec(model, cache)
    slot_tokens = a["runtime_slot_tokens"]
    if slot_tokens is None:
        kept = hist if full else budget_tokens(cache, hist - 1) + 1
        slot_tokens = kept + (answer if full else max(answer, spec.evict_every))
    store = KVStore([MemoryTier("cpu", 1 << 20, "cpu")], namespace(bench="capacity"), block=16)
    cfg = EngineConfig(cache=spec, device=device, max_active=a["max_active"], max_queue=1 << 20,
                       max_new_tokens=answer, runtime_slots=a["slots"], runtime_slot_tokens=slot_tokens,
                       runtime_compile=a["runtime_compile"], runtime_reserve_gib=a["reserve_gib"],
                       save_finished=False)
    engine = Engine(model, _Tokenizer(), store, cfg).start()
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    done: list[dict[str, Any]] = []
    lock = threading.Condition()

    def placed() -> Any:  # the KV of prompt[:-1], as right after its prefill (and compression)
        if full:
            return full_cache(model, 1, hist - 1, device)
        return filled_cache(model, spec.to_dict(), 1, hist - 1, device)

    def submit() -> None:
        prompt = torch.randint(100, vocab, (hist,), generator=g).tolist()

        def emit(ev: dict[str, Any]) -> None:
            if ev["type"] in ("done", "error"):
                with lock:
                    done.append(ev)
                    lock.notify_all()

        engine.submit(GenRequest(prompt=prompt, max_tokens=answer, emit=emit, prefilled=placed))

    t_start = time.perf_counter()
    submit()
    while engine.runtime is None and engine.runtime_off is None and not done:
        time.sleep(0.01)  # the pool is built when the first request joins
    if engine.runtime is None:
        engine.shutdown()
        raise RuntimeError(f"no decode runtime: {engine.runtime_off or done[:1]}")
    pool = engine.runtime.pool
    slots = pool.max_seqs
    for _ in range(slots - 1):
        submit()
    samples: list[tuple[float, int, int]] = []  # (time, decode steps, decode rows)
    peak = 0
    timed_out = False
    while True:
        c = engine.metrics.counters
        samples.append((time.perf_counter(), c.get("runtime_decode_steps", 0), c.get("runtime_decode_rows", 0)))
        peak = max(peak, slots - pool.free_slots())
        with lock:
            if len(done) >= slots:
                break
        if time.perf_counter() - t_start > a["time_limit"]:
            timed_out = True
            break
        time.sleep(a["poll_s"])
    wall = time.perf_counter() - t_start
    engine.shutdown()
    store.close()
    slot_bytes, pool_bytes = pool.slot_nbytes(), pool.nbytes()
    fallback = engine.metrics.counters.get("runtime_fallback_total", 0)
    engine = pool = None
    free(device)  # the next case sizes its pool by the memory this one leaves
    errors = [ev for ev in done if ev["type"] == "error"]
    # The steady state: the longest run of decode steps that each decoded every slot. A step's counters move when
    # its launch returns, and the next launch waits for the step's tokens, so the time between the samples that
    # first see the run's first and last steps, over the steps between them, is the time a step takes.
    runs: list[list[int]] = []  # per run, the samples that saw its steps
    cur: list[int] = []
    for i in range(1, len(samples)):
        ds = samples[i][1] - samples[i - 1][1]
        if ds == 0:
            continue
        if samples[i][2] - samples[i - 1][2] == ds * slots:
            cur.append(i)
        else:  # a step with a slot idle (joining, or finished) ends the run
            runs, cur = (runs + [cur] if cur else runs), []
    runs += [cur] if cur else []
    run = max(runs, key=lambda x: samples[x[-1]][1] - samples[x[0]][1], default=None)
    steady_steps, steady_t = 0, 0.0
    if run:
        (t0, s0, _), (t1, s1, _) = samples[run[0]], samples[run[-1]]
        steady_steps, steady_t = s1 - s0, t1 - t0
    rows_full = steady_steps * slots
    for (_, s_prev, _), (t, s, r) in zip(samples, samples[1:]):
        if s != s_prev:  # the samples that saw a step
            ctx.record({"case": case.name, "t": t - t_start, "decode_steps": s, "decode_rows": r})
    row = {"method": "full" if full else spec.method, "cache": None if full else spec.to_text(),
           "history": hist, "answer_tokens": answer, "runtime_slot_tokens": slot_tokens,
           "max_batch": slots, "peak_slots_in_use": peak, "slot_bytes": slot_bytes,
           "pool_bytes": pool_bytes, "requests": len(done), "errors": len(errors),
           "first_error": errors[0].get("message") if errors else None, "wall_s": wall,
           "time_limit_reached": timed_out, "steady_steps": steady_steps, "steady_s": steady_t,
           "steady_ms_per_step": 1e3 * steady_t / steady_steps if steady_steps else None,
           "steady_decode_tokens_per_s": rows_full / steady_t if steady_t else None,
           "runtime_fallback": fallback}
    ctx.progress(case, row)
    return [row]
