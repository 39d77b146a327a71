"""The serving engine on the decode runtime (``EngineConfig.runtime_slots``): requests (full cache or compressed)
decode together in one batched step, and answer exactly what the engine without the runtime answers (greedy),
across turns reusing the store (a finished slot is exported back into its cache and saved), with requests the pool
cannot hold falling back to their own cache."""

from __future__ import annotations

import threading

import pytest

from squeezekv.serve import Engine, EngineConfig, GenRequest
from squeezekv.serve.chartok import CharTokenizer
from squeezekv.store import KVStore, MemoryTier, namespace

MODEL = "tiny-llama"
PROMPTS = ["The quick brown fox jumps over", "A long prompt about ships and stars and friends", "Hello there,",
           "Numbers: one two three four five six"]


def _engine(build_model, cache, **cfg):
    model = build_model("llama", layers=2, max_position_embeddings=1024)
    store = KVStore([MemoryTier("gpu", 1 << 20, "cpu"), MemoryTier("cpu", 4 << 20, "cpu")],
                    namespace(model=MODEL, cache=cache), block=8)
    return Engine(model, CharTokenizer(), store, EngineConfig(model_name=MODEL, cache=cache, max_new_tokens=64,
                                                              **cfg)).start()


def _run(engine, prompts, max_tokens=12):
    """Submit every prompt at once (greedy) and wait: ``[(text, usage)]`` in prompt order."""
    done = [threading.Event() for _ in prompts]
    out: list[list] = [["", None] for _ in prompts]

    def emit_for(i):
        def emit(ev):
            if ev["type"] == "delta":
                out[i][0] += ev["text"]
            elif ev["type"] == "done":
                out[i][1] = ev["usage"]
                done[i].set()
            else:
                out[i][1] = ev
                done[i].set()
        return emit

    tok = CharTokenizer()
    for i, p in enumerate(prompts):
        engine.submit(GenRequest(prompt=tok(p)["input_ids"], max_tokens=max_tokens, emit=emit_for(i), user=str(i)))
    for d in done:
        assert d.wait(120)
    for _, usage in out:
        assert "message" not in usage, usage
    return [tuple(x) for x in out]


@pytest.mark.parametrize("cache", ["method=h2o budget=16 allocation=uniform evict_every=4",
                                   "method=snapkv budget=16 allocation=uniform", None])
def test_runtime_engine_answers_what_the_engine_answers(cache, make_model):
    ref = _engine(make_model, cache)
    rt = _engine(make_model, cache, runtime_slots=4, runtime_slot_tokens=64)
    try:
        want, got = _run(ref, PROMPTS), _run(rt, PROMPTS)
        assert [t for t, _ in got] == [t for t, _ in want]
        c = rt.metrics.counters
        assert rt.runtime_off is None and c["runtime_decode_steps"] > 0
        assert c["runtime_decode_rows"] > c["runtime_decode_steps"]  # rows decoded together
        assert rt.runtime.pool.free_slots() == 4  # every slot released
        # turn 2 of each conversation: its history (turn 1 as exported from the slot) comes from the store
        for e in (ref, rt):
            e.store.flush()
        second = [p + t + " and then?" for p, (t, _) in zip(PROMPTS, want)]
        want2, got2 = _run(ref, second), _run(rt, second)
        assert [t for t, _ in got2] == [t for t, _ in want2]
        assert [u["cached_tokens"] for _, u in got2] == [u["cached_tokens"] for _, u in want2]
        assert all(u["cached_tokens"] > 0 for _, u in got2)
    finally:
        ref.shutdown()
        rt.shutdown()


def test_requests_the_pool_cannot_hold_decode_on_their_own(make_model):
    cache = "method=snapkv budget=16 allocation=uniform"
    ref = _engine(make_model, cache)
    rt = _engine(make_model, cache, runtime_slots=2, runtime_slot_tokens=20)  # 16 kept + 12 new > 20
    try:
        want, got = _run(ref, PROMPTS[:3]), _run(rt, PROMPTS[:3])
        assert [t for t, _ in got] == [t for t, _ in want]
        assert rt.metrics.counters["runtime_fallback_total"] == 3 and rt.metrics.counters["runtime_decode_steps"] == 0
    finally:
        ref.shutdown()
        rt.shutdown()


def test_runtime_config_is_validated():
    with pytest.raises(ValueError, match="runtime_slots"):
        EngineConfig(runtime_slots=-1, cache="method=h2o budget=16").validate()
    with pytest.raises(TypeError, match="runtime_compile"):
        EngineConfig(runtime_slots=2, runtime_compile="yes").validate()
    with pytest.raises(ValueError, match="runtime_slot_tokens"):
        EngineConfig(runtime_slots=2, runtime_slot_tokens=0, cache="method=h2o budget=16").validate()


def test_admission_counts_free_slots_not_max_active(make_model):
    """max_active=1 bounds only the requests outside the pool: four conversations decode together in four slots;
    with two slots, the others wait for a free one (none decodes on its own)."""
    cache = "method=h2o budget=16 allocation=uniform evict_every=4"
    ref = _engine(make_model, cache)
    wide = _engine(make_model, cache, max_active=1, runtime_slots=4, runtime_slot_tokens=64)
    narrow = _engine(make_model, cache, max_active=1, runtime_slots=2, runtime_slot_tokens=64)
    try:
        want = [t for t, _ in _run(ref, PROMPTS)]
        for e in (wide, narrow):
            assert [t for t, _ in _run(e, PROMPTS)] == want
            c = e.metrics.counters
            assert c["runtime_fallback_total"] == 0 and c["runtime_decode_rows"] == len(PROMPTS) * 11
        assert wide.metrics.counters["runtime_decode_steps"] < narrow.metrics.counters["runtime_decode_steps"]
    finally:
        for e in (ref, wide, narrow):
            e.shutdown()


def test_chunked_prefill_runs_one_chunk_per_iteration(make_model):
    """A cache specification with prefill_chunk: each new prompt is prefilled one chunk per engine iteration (the
    running requests decode in between) and the answers equal those of the engine without the runtime (same
    chunks); the chunks are counted."""
    cache = "method=h2o budget=16 allocation=uniform evict_every=4 prefill_chunk=8"
    ref = _engine(make_model, cache)
    rt = _engine(make_model, cache, runtime_slots=4, runtime_slot_tokens=64)
    prompts = PROMPTS + ["x" * 90]
    try:
        want, got = _run(ref, prompts), _run(rt, prompts)
        assert [t for t, _ in got] == [t for t, _ in want]
        tok = CharTokenizer()
        chunks = sum(-(-len(tok(p)["input_ids"]) // 8) for p in prompts)
        assert rt.metrics.counters["prefill_chunks_total"] == ref.metrics.counters["prefill_chunks_total"] == chunks
        assert rt.metrics.counters["runtime_decode_steps"] > 0
    finally:
        ref.shutdown()
        rt.shutdown()
