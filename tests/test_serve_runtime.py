"""The serving engine on the decode runtime (``EngineConfig.runtime_slots``): requests (full cache or compressed)
decode together in one batched step, and answer exactly what the engine without the runtime answers (greedy),
across turns reusing the store (a finished slot is exported back into its cache and saved), with requests the pool
cannot hold falling back to their own cache."""

from __future__ import annotations

import os
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


def _run(engine, prompts, max_tokens=12, fields=None):
    """Submit every prompt at once (greedy, or ``fields[i]``: more GenRequest fields of prompt ``i``) and wait:
    ``[(text, usage)]`` in prompt order."""
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
        engine.submit(GenRequest(prompt=tok(p)["input_ids"], max_tokens=max_tokens, emit=emit_for(i), user=str(i),
                                 **(fields[i] if fields else {})))
    for d in done:
        assert d.wait(120)
    for _, usage in out:
        assert "message" not in usage, usage
    return [tuple(x) for x in out]


@pytest.mark.parametrize("cache", ["method=h2o budget=16 allocation=uniform evict_every=4",
                                   "method=snapkv budget=16 allocation=uniform", None,
                                   "method=snapkv budget=24 allocation=uniform channel=kivi channel.bits=2 "
                                   "channel.group_size=4 channel.residual=8"])
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


def _submit_wait(engine, **kw):
    """Submit one request (``kw``: GenRequest fields) and wait for its end: ``(text, usage or error event)``."""
    done, out = threading.Event(), ["", None]

    def emit(ev):
        if ev["type"] == "delta":
            out[0] += ev["text"]
        else:
            out[1] = ev.get("usage", ev)
            done.set()

    engine.submit(GenRequest(emit=emit, **kw))
    assert done.wait(120)
    return tuple(out)


@pytest.mark.parametrize("cache", ["method=snapkv budget=16 allocation=uniform", None])
def test_a_prefilled_history_answers_what_its_prompt_answers(cache, make_model):
    """GenRequest.prefilled (a benchmark placing a history's KV directly): the engine feeds only the prompt's last
    token to the cache it returns. On the runtime the answer equals the engine's without it; with the full cache it
    also equals the answer of the prompt prefilled by the engine (a compressed cache compresses prompt[:-1] instead,
    so its answer may differ)."""
    import torch
    from transformers import DynamicCache

    from squeezekv import make_cache
    from squeezekv.generation import cache_kwargs

    ref = _engine(make_model, cache)
    rt = _engine(make_model, cache, runtime_slots=2, runtime_slot_tokens=64)
    try:
        prompt = CharTokenizer()(PROMPTS[1])["input_ids"]

        def placed_in(engine):
            def placed():
                c = make_cache(engine.model, cache) if cache else DynamicCache(config=engine.model.config)
                with torch.no_grad():
                    engine.model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True,
                                 **cache_kwargs(engine.model, c))
                return c
            return placed

        want = _submit_wait(ref, prompt=prompt, max_tokens=12, prefilled=placed_in(ref))
        got = _submit_wait(rt, prompt=prompt, max_tokens=12, prefilled=placed_in(rt))
        assert got[0] == want[0] and got[1]["completion_tokens"] == 12
        assert rt.metrics.counters["runtime_decode_steps"] > 0 and rt.metrics.counters["runtime_fallback_total"] == 0
        if cache is None:
            assert _submit_wait(rt, prompt=prompt, max_tokens=12)[0] == got[0]
    finally:
        ref.shutdown()
        rt.shutdown()


def test_a_joined_request_frees_its_own_copy_of_the_kv(make_model):
    """Once a request's KV is in a slot its own cache holds no entries (no second copy for the whole request); the
    export at the end writes the slot back (the two-turn test checks that turn 2 reuses it exactly)."""
    cache = "method=h2o budget=16 allocation=uniform evict_every=4"
    rt = _engine(make_model, cache, runtime_slots=2, runtime_slot_tokens=64)
    seen = []
    try:
        real = rt._join_runtime

        def spy(req):
            real(req)
            seen.append([(x.keys.shape[2], x.values.shape[2], x.token_idx.shape[2]) for x in req.cache.layers])

        rt._join_runtime = spy  # an instance attribute: observes the engine's own call
        _submit_wait(rt, prompt=CharTokenizer()(PROMPTS[0])["input_ids"], max_tokens=6)
        assert seen == [[(0, 0, 0)] * 2]
    finally:
        rt.shutdown()


def test_runtime_slots_auto_sizes_the_pool_by_free_memory(make_model):
    """runtime_slots='auto': the pool gets as many slots as free memory less the reserve holds; a reserve larger
    than the memory leaves no slot, and the requests decode on their own (same answers), with the reason said."""
    cache = "method=h2o budget=16 allocation=uniform evict_every=4"
    ref = _engine(make_model, cache)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    spare = 256 << 20  # leave ~256 MiB to the pool (the host's free memory drifts meanwhile)
    auto = _engine(make_model, cache, runtime_slots="auto", runtime_slot_tokens=64,
                   runtime_reserve_gib=(free - spare) / (1 << 30))
    none = _engine(make_model, cache, runtime_slots="auto", runtime_slot_tokens=64, runtime_reserve_gib=1 << 19)
    try:
        want = [t for t, _ in _run(ref, PROMPTS[:2])]
        assert [t for t, _ in _run(auto, PROMPTS[:2])] == want
        pool = auto.runtime.pool
        assert pool.slot_nbytes() == pool.bytes_per_slot([64] * 2, pool.kv_heads, pool.head_dim, pool.dtype, True)
        expected = spare // pool.slot_nbytes() - 1
        assert 1 <= pool.max_seqs and abs(pool.max_seqs - expected) <= expected // 2, (pool.max_seqs, expected)
        assert [t for t, _ in _run(none, PROMPTS[:2])] == want
        assert none.runtime is None and "holds no slot" in none.runtime_off
    finally:
        for e in (ref, auto, none):
            e.shutdown()
    with pytest.raises(ValueError, match="runtime_slots='x'"):
        EngineConfig(runtime_slots="x").validate()
    with pytest.raises(ValueError, match="runtime_reserve_gib"):
        EngineConfig(runtime_slots="auto", runtime_reserve_gib=-1).validate()


def test_sampled_requests_on_the_runtime_answer_what_the_engine_answers(make_model):
    """Seeded sampling (temperature, top_p, seed) of requests decoding together in the runtime's batched step gives
    what the engine without the runtime gives: each request's draws come from its own generator, whatever the
    batch; two seeds give two different answers."""
    cache = "method=h2o budget=16 allocation=uniform evict_every=4"
    ref = _engine(make_model, cache)
    rt = _engine(make_model, cache, runtime_slots=4, runtime_slot_tokens=64)
    try:
        def answers(engine, seed):  # every prompt submitted at once: they decode together
            fields = [dict(temperature=0.9, top_p=0.9, seed=seed + i) for i in range(len(PROMPTS))]
            return [t for t, _ in _run(engine, PROMPTS, fields=fields)]

        want = answers(ref, 5)
        assert answers(rt, 5) == want
        assert answers(rt, 50) != want
        c = rt.metrics.counters
        assert c["runtime_decode_rows"] > c["runtime_decode_steps"] > 0  # rows decoded together
    finally:
        ref.shutdown()
        rt.shutdown()


def test_the_full_cache_prefills_in_chunks_between_decode_steps(make_model):
    """EngineConfig.prefill_chunk (``squeezekv serve --prefill-chunk`` without a compressed cache): a new prompt of
    the full cache is prefilled one chunk per engine iteration, on the runtime or not, with the answers of the
    unchunked engine; a compressed cache is told to use its specification's."""
    ref = _engine(make_model, None)
    chunked = _engine(make_model, None, prefill_chunk=8, runtime_slots=4, runtime_slot_tokens=128)
    prompts = PROMPTS + ["y" * 70]
    try:
        want, got = _run(ref, prompts), _run(chunked, prompts)
        assert [t for t, _ in got] == [t for t, _ in want]
        tok = CharTokenizer()
        chunks = sum(-(-len(tok(p)["input_ids"]) // 8) for p in prompts)
        assert chunked.metrics.counters["prefill_chunks_total"] == chunks
        assert "prefill_chunks_total" not in ref.metrics.counters
    finally:
        ref.shutdown()
        chunked.shutdown()
    with pytest.raises(ValueError, match="prefill_chunk is the full cache's"):
        EngineConfig(cache="method=h2o budget=16", prefill_chunk=8).validate()
    with pytest.raises(ValueError, match="prefill_chunk=0"):
        EngineConfig(prefill_chunk=0).validate()


def test_prefill_budget_bounds_the_prompt_tokens_of_an_iteration_while_others_decode(make_model):
    """While a request decodes, an iteration starts no prefill step once it has fed the prefill budget (default:
    one chunk) of new prompts' tokens, the other prefills wait for the next iteration (counted); the answers equal
    an engine without the limit; a bad budget is refused by name."""
    # (without the runtime: on it, the full cache's prompts prefill a chunk inside each decode step instead)
    unlimited = _engine(make_model, None, prefill_chunk=8, prefill_budget=1 << 20)
    limited = _engine(make_model, None, prefill_chunk=8)
    tok = CharTokenizer()
    long = ["x" * 41, "the ships and the stars " * 2, "y" * 33]
    try:
        answers = []
        for engine in (unlimited, limited):
            first = threading.Event()

            def emit(ev, first=first):
                if ev["type"] == "delta":
                    first.set()
            runner = GenRequest(prompt=tok("Hi")["input_ids"], max_tokens=60, emit=emit, user="runner")
            engine.submit(runner)
            assert first.wait(60)  # it decodes while the long prompts arrive
            texts = _run(engine, long)
            answers.append([t for t, _ in texts])
        assert answers[0] == answers[1]
        # no further step once 8 tokens are fed: at most 7 + one chunk of 8 (the three prompts' chunks at once: 24)
        assert limited.prefill_budget == 8 and limited.busiest_prefill < 16 <= unlimited.busiest_prefill
        assert limited.metrics.counters["prefill_deferred_total"] > 0
        assert unlimited.metrics.counters["prefill_deferred_total"] == 0
    finally:
        unlimited.shutdown()
        limited.shutdown()
    with pytest.raises(ValueError, match="prefill_budget=0"):
        EngineConfig(prefill_budget=0).validate()


@pytest.mark.parametrize("cache", [None, "method=h2o budget=16 allocation=uniform evict_every=4 prefill_chunk=8"])
def test_chunked_prefill_of_one_chunk_and_of_a_reused_history_joins_one_slot(cache, make_model):
    """A prompt of one chunk ends its chunked prefill at its first step, and the full cache's new tokens after a
    reused turn-1 history are chunked too: each request joins the runtime once (one slot, all released at the end),
    turn 2 reuses turn 1 exactly as exported and every answer equals the unchunked engine's without the runtime."""
    ref = _engine(make_model, None if cache is None else cache.replace(" prefill_chunk=8", ""))
    rt = _engine(make_model, cache, runtime_slots=4, runtime_slot_tokens=160,
                 **({"prefill_chunk": 8} if cache is None else {}))
    first = ["Hi", "Hey you", PROMPTS[0]]  # one chunk, one chunk, several
    try:
        want, got = _run(ref, first), _run(rt, first)
        assert [t for t, _ in got] == [t for t, _ in want]
        for e in (ref, rt):
            e.store.flush()
        second = [p + t + " and what came after that?" for p, (t, _) in zip(first, want)]  # > one chunk new
        want2, got2 = _run(ref, second), _run(rt, second)
        assert [t for t, _ in got2] == [t for t, _ in want2]
        assert [u["cached_tokens"] for _, u in got2] == [u["cached_tokens"] for _, u in want2]
        assert all(u["cached_tokens"] > 0 for _, u in got2)
        c = rt.metrics.counters
        assert c["runtime_fallback_total"] == 0 and c["store_errors_total"] == 0
        assert rt.runtime.pool.free_slots() == 4
    finally:
        ref.shutdown()
        rt.shutdown()


def test_a_cancelled_request_leaves_its_slot_without_saving(make_model):
    """A request cancelled while it decodes in a slot frees the slot and saves nothing (its own cache was emptied when
    it joined and the slot is not exported): no store error, the next request runs."""
    cache = "method=h2o budget=16 allocation=uniform evict_every=4"
    rt = _engine(make_model, cache, runtime_slots=2, runtime_slot_tokens=64)
    tok = CharTokenizer()
    try:
        done = threading.Event()
        events = []
        req = None

        def emit(ev):
            events.append(ev["type"])
            if ev["type"] == "delta" and len(events) == 2:
                req.cancelled.set()
            if ev["type"] in ("done", "error"):
                done.set()

        req = GenRequest(prompt=tok(PROMPTS[0])["input_ids"], max_tokens=40, emit=emit)
        rt.submit(req)
        assert done.wait(60)
        rt.store.flush()
        c = rt.metrics.counters
        assert c["cancelled_requests_total"] == 1 and "store_errors_total" not in c
        assert rt.runtime.pool.free_slots() == 2 and len(events) < 40
        assert _submit_wait(rt, prompt=tok(PROMPTS[1])["input_ids"], max_tokens=5)[1]["completion_tokens"] == 5
    finally:
        rt.shutdown()


@pytest.mark.parametrize("chunk", [4, 16])
def test_full_cache_prompts_prefill_in_the_decode_steps(chunk, make_model):
    """The full cache on the runtime with prefill_chunk: new prompts (and the new tokens after a reused history)
    are fed to their slots a chunk inside each decode step; the greedy answers and the reuse over two turns equal
    the engine's without the runtime."""
    ref = _engine(make_model, None)
    rt = _engine(make_model, None, runtime_slots=4, runtime_slot_tokens=128, prefill_chunk=chunk)
    try:
        want, got = _run(ref, PROMPTS), _run(rt, PROMPTS)
        assert [t for t, _ in got] == [t for t, _ in want]
        c = rt.metrics.counters
        assert rt.runtime.prefill_chunk == chunk and c["runtime_mixed_steps"] > 0
        lengths = [len(CharTokenizer()(p)["input_ids"]) for p in PROMPTS]
        assert c["prefill_chunks_total"] == sum(-(-n // chunk) for n in lengths)
        assert c.get("runtime_fallback_total", 0) == 0 and rt.runtime.pool.free_slots() == 4
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


def test_short_prefills_go_first_and_long_ones_do_not_starve(make_model):
    """The chunk of a step goes to the pooled prefill with the fewest tokens left (so a turn reusing its history
    answers before long recomputations finish), but a prefill that waited STARVE_STEPS steps goes first."""
    from squeezekv.serve import engine as eng

    e = _engine(make_model, None, runtime_slots=4, runtime_slot_tokens=128, prefill_chunk=4)
    try:
        long, short = GenRequest(prompt=[5] * 40, max_tokens=2, emit=lambda ev: None), \
            GenRequest(prompt=[6] * 3, max_tokens=2, emit=lambda ev: None)
        for r, left, t in ((long, 36, 1.0), (short, 3, 2.0)):
            r.prefilling, r.prefill_tokens, r.t_submit = eng._IN_POOL, [7] * left, t
        e.active = [long, short]
        assert e._next_chunk() is short
        long.chunk_wait = eng.STARVE_STEPS
        assert e._next_chunk() is long
        e.active = []
    finally:
        e.shutdown()
