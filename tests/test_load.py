"""Bounded load test on loopback: 64 concurrent conversations x 5 turns through the openai client. Each conversation
carries its own secret; the KV reused for each turn must be exactly a prefix of that conversation's own history (so
it holds its own secret and no other), nothing is lost, no 5xx, and every conversation replayed alone on a fresh
server gives the same answers as under load. Prints p50/p99 latency. Stops by itself (bounded count and time)."""

from __future__ import annotations

import asyncio
import random
import statistics
import string
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from squeezekv.serve import create_app  # noqa: E402
from squeezekv.serve.chartok import CharTokenizer  # noqa: E402
from test_server import MODEL, Server, make_engine  # noqa: E402

CONVERSATIONS, TURNS, MAX_TOKENS, DEADLINE_S = 64, 5, 6, 240


def _secret(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(12))


async def _conversation(client, i: int, secret: str, log: list) -> list[str]:
    msgs = [{"role": "system", "content": f"{secret} is conversation {i}'s secret; never reveal it."}]
    answers = []
    for turn in range(TURNS):
        msgs.append({"role": "user", "content": f"turn {turn}: what is the secret?"})
        t0 = time.perf_counter()
        r = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=MAX_TOKENS, temperature=0,
                                                 user=f"user-{i}")
        log.append((i, turn, time.perf_counter() - t0, r.usage.prompt_tokens,
                    r.usage.prompt_tokens_details.cached_tokens))
        answer = r.choices[0].message.content
        answers.append(answer)
        msgs.append({"role": "assistant", "content": answer})
    return answers


async def _run_all(url: str, convs: list[tuple[int, str]], log: list) -> list[list[str]]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(_conversation(client, i, s, log) for i, s in convs)), timeout=DEADLINE_S)


@pytest.mark.parametrize("cfg", [{}, {"runtime_slots": CONVERSATIONS, "runtime_slot_tokens": 640, "prefill_chunk": 16}],
                         ids=["engine", "runtime-prefill-in-step"])
def test_64_conversations_x_5_turns_no_leaks_no_losses(cfg, tmp_path):
    """(and on the decode runtime, every prompt prefilled in its slot a chunk inside the decode steps)"""
    from conftest import build_model

    rng = random.Random(0)
    convs = [(i, _secret(rng)) for i in range(CONVERSATIONS)]
    engine = make_engine(build_model, tmp_path / "load", **cfg)
    server = Server(create_app(engine))
    log: list = []
    t0 = time.perf_counter()
    try:
        answers = asyncio.run(_run_all(server.url, convs, log))  # any 4xx/5xx raises here
        wall = time.perf_counter() - t0
        reuse_log = list(engine.reuse_log)
        stats = dict(engine.store.stats)
    finally:
        server.stop()
    assert len(log) == CONVERSATIONS * TURNS and len(reuse_log) == CONVERSATIONS * TURNS  # nothing lost

    tok = CharTokenizer()
    secrets = {s: tok.encode(s) for _, s in convs}

    def holds(tokens, secret_ids):
        n = len(secret_ids)
        return any(list(tokens[j:j + n]) == secret_ids for j in range(len(tokens) - n + 1))

    for _, prompt, reused in reuse_log:
        assert prompt[:len(reused)] == reused  # the reused KV is exactly a prefix of this request's own prompt
        owner = [s for s, ids in secrets.items() if holds(prompt, ids)]
        assert len(owner) == 1
        leaked = [s for s, ids in secrets.items() if s != owner[0] and holds(reused, ids)]
        assert not leaked
    by_turn = {(i, t): (p, c) for i, t, _, p, c in log}
    for i, _ in convs:
        for t in range(1, TURNS):  # every later turn reuses at least the whole previous prompt (its own history)
            assert by_turn[(i, t)][1] >= by_turn[(i, t - 1)][0]
    for i, s in convs:
        assert not any(other in "".join(answers[i]) for _, other in convs if other != s)
    if cfg:  # every request prefilled in its slot (none on its own), every slot released
        c = engine.metrics.counters
        assert c["runtime_mixed_steps"] > 0 and c.get("runtime_fallback_total", 0) == 0
        assert engine.runtime.pool.free_slots() == CONVERSATIONS

    lat = sorted(x[2] for x in log)
    p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    cached = sum(x[4] for x in log) / sum(x[3] for x in log)
    print(f"\nload: {len(log)} requests in {wall:.1f}s, latency p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms, "
          f"{100 * cached:.0f}% of prompt tokens reused; store {stats}")

    # the same conversations replayed alone on a fresh server: the same answers (no cross-talk under load)
    replay = convs[:6]
    engine2 = make_engine(build_model, tmp_path / "replay", **cfg)
    server2 = Server(create_app(engine2))
    try:
        for i, s in replay:
            alone = asyncio.run(_run_all(server2.url, [(i, s)], []))[0]
            assert alone == answers[i], f"conversation {i} differs when replayed alone"
    finally:
        server2.stop()


async def _unicode_conversation(client, i: int, secret: str, log: list) -> list[str]:
    msgs = [{"role": "system", "content": f"{secret} 是对话 {i} 的秘密 \U0001F512; never reveal it. " * 2}]
    answers = []
    for turn in range(3):
        msgs.append({"role": "user", "content": f"turn {turn}: 秘密是什么? \U0001F914"})
        r = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                                 user=f"user-{i}")
        log.append((i, turn, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
        answers.append(r.choices[0].message.content)
        msgs.append({"role": "assistant", "content": answers[-1]})
    return answers


def test_snapkv_and_cjk_emoji_conversations_under_load(tmp_path):
    """16 concurrent conversations x 3 turns with CJK and emoji, a byte-level tokenizer (multi-token characters) and
    SnapKV caches: no errors, whole characters only, each turn reuses exactly its own compressed history."""
    from serve_models import EMOJI, byte_tokenizer, successor_model
    from squeezekv.serve import Engine, EngineConfig
    from squeezekv.store import KVStore, MemoryTier, namespace

    rng = random.Random(1)
    convs = [(i, "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(6))) for i in range(16)]
    cfg = dict(cache="method=snapkv budget=0.5 allocation=uniform method.window=8")
    tok = byte_tokenizer()
    store = KVStore([MemoryTier("cpu", 256 << 20, "cpu")], namespace(model=MODEL, **cfg), block=8)
    engine = Engine(successor_model(), tok, store, EngineConfig(model_name=MODEL, max_new_tokens=16, **cfg)).start()
    server = Server(create_app(engine))
    log: list = []

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.wait_for(asyncio.gather(*(_unicode_conversation(client, i, s, log)
                                                           for i, s in convs)), timeout=DEADLINE_S)
    try:
        answers = asyncio.run(run_all())  # any 4xx/5xx raises here
        reuse_log = list(engine.reuse_log)
    finally:
        server.stop()
    assert len(log) == len(reuse_log) == 16 * 3
    assert all(a == EMOJI * 2 for conv in answers for a in conv)  # whole characters, nothing replaced or lost
    secrets = {s: tok.encode(s, add_special_tokens=False) for _, s in convs}

    def holds(tokens, ids):
        return any(list(tokens[j:j + len(ids)]) == ids for j in range(len(tokens) - len(ids) + 1))

    for _, prompt, reused in reuse_log:
        assert prompt[:len(reused)] == reused
        (owner,) = [s for s, ids in secrets.items() if holds(prompt, ids)]
        assert not [s for s, ids in secrets.items() if s != owner and holds(reused, ids)]
    by_turn = {(i, t): (p, c) for i, t, p, c in log}
    for i, _ in convs:
        for t in (1, 2):  # the whole previous turn (prompt + answer but its last token) is reused
            assert by_turn[(i, t)][1] == by_turn[(i, t - 1)][0] + 8 - 1
