"""``squeezekv serve`` under bad input, hostile clients and faults (issue 19), through uvicorn on 127.0.0.1: whole
characters in streamed text, stop strings that never leak, 4xx instead of 500, body limits on bytes read, per-user
and per-key cache scopes, API keys, checksummed and token-checked disk entries, failing tiers as misses, a locked,
private disk folder, cancellation on disconnect, bounded shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_models import CJK, EMOJI, byte_tokenizer, expected, successor_model  # noqa: E402
from squeezekv.commands.serve import uvicorn_config  # noqa: E402
from squeezekv.serve import Engine, EngineConfig, create_app  # noqa: E402
from squeezekv.serve.app import key_id  # noqa: E402
from squeezekv.serve.chartok import CharTokenizer  # noqa: E402
from squeezekv.store import LOCK_NAME, DiskTier, FolderInUse, KVStore, MemoryTier, namespace  # noqa: E402
from test_server import MODEL, start_in_thread  # noqa: E402


class Server:
    """The server as ``squeezekv serve`` runs it (:func:`uvicorn_config`), on a free port, in a thread."""

    def __init__(self, engine: Engine, uvicorn_kw: dict | None = None, **app_kw):
        self.engine = engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        from squeezekv.commands.serve import _server_class

        self.server = _server_class()(uvicorn_config(create_app(engine, **app_kw), "127.0.0.1", port,
                                                     **{"shutdown_timeout": 5, "log_level": "warning",
                                                        **(uvicorn_kw or {})}))
        self.thread = start_in_thread(self.server)
        self.url = f"http://127.0.0.1:{port}"

    def client(self, key: str = "unused", timeout: float = 60) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=timeout)

    def metric(self, name: str, headers: dict | None = None) -> float:
        text = httpx.get(self.url + "/metrics", headers=headers).text
        return sum(float(line.split(" ")[-1]) for line in text.splitlines() if line.startswith(name))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RecordingEngine(Engine):
    """Records every submitted request (to check the identity the app gave it)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def submit(self, req) -> None:
        self.seen.append(req)
        super().submit(req)


def _engine(model, tokenizer, tiers, cfg: dict | None = None, **config) -> RecordingEngine:
    cfg = cfg or {}
    store = KVStore(tiers, namespace(model=MODEL, **cfg), block=8)
    config.setdefault("max_new_tokens", 64)
    return RecordingEngine(model, tokenizer, store, EngineConfig(model_name=MODEL, **cfg, **config)).start()


def _memory():
    return [MemoryTier("cpu", 64 << 20, "cpu")]


@pytest.fixture(scope="module")
def bytes_server():
    """The successor model behind a byte-level tokenizer (known greedy answers, multi-token characters)."""
    with Server(_engine(successor_model(), byte_tokenizer(), _memory())) as srv:
        yield srv


@pytest.fixture(scope="module")
def char_model():
    from conftest import build_model

    return build_model("llama", layers=2, max_position_embeddings=1024)


# -- 1. non-ASCII answers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, char", [(f"Here are some emoji: {EMOJI}\U0001F601\U0001F602 ", EMOJI),
                                          ("CJK =", CJK)])
def test_multi_token_characters_are_streamed_whole(bytes_server, prompt, char):
    client = bytes_server.client()
    n = 4 * len(char.encode())  # exactly four characters' worth of tokens
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
    assert full.choices[0].text == char * 4 == expected(prompt, n)
    pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=n,
                                                                   temperature=0, stream=True)]
    assert "".join(pieces) == char * 4 and not any("\ufffd" in p for p in pieces)


def test_emoji_chat_and_a_character_cut_by_max_tokens(bytes_server):
    client = bytes_server.client()
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"{CJK} and {EMOJI}?"}],
                                       max_tokens=8, temperature=0)  # the template ends in ' ': emoji follow
    assert r.choices[0].message.content == EMOJI * 2
    cut = client.completions.create(model=MODEL, prompt="x ", max_tokens=6, temperature=0)  # 1.5 emoji
    assert cut.choices[0].text == expected("x ", 6) == EMOJI + "\ufffd"  # what the tokenizer decodes, nothing lost


# -- 12. multi-token stop strings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_never_leak_their_first_part(bytes_server, stream):
    client = bytes_server.client()

    def run(stop):
        r = client.completions.create(model=MODEL, prompt="Hello a", max_tokens=40, temperature=0, stop=stop,
                                      stream=stream)
        return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

    assert expected("a", 40) == "bcdefghijklmnopqrstuvwxyz"
    assert run(["def"]) == "bc"
    assert run(["xyz", "ghi"]) == "bcdef"
    assert run(["dex"]) == "bcdefghijklmnopqrstuvwxyz"  # a prefix held back, then released when it cannot match
    assert run(["yz!"]) == "bcdefghijklmnopqrstuvwxyz"  # ... also at the end of the answer (EOS)


# -- 11. edge inputs ------------------------------------------------------------------------------------------------
def test_edge_inputs_are_4xx_or_computed_stably(bytes_server):
    client = bytes_server.client()
    greedy = client.completions.create(model=MODEL, prompt="Hello a", max_tokens=5, temperature=0).choices[0].text
    tiny = client.completions.create(model=MODEL, prompt="Hello a", max_tokens=5, temperature=1e-40).choices[0].text
    assert tiny == greedy == "bcdef"
    ok = client.completions.create(model=MODEL, prompt="a", max_tokens=3, temperature=1, seed=(1 << 64) - 1)
    assert ok.usage.completion_tokens >= 1
    for body, param in ((dict(seed=1 << 64), "seed"), (dict(seed=-(1 << 63) - 1), "seed"),
                        (dict(prompt="lone \ud800 surrogate"), "prompt"), (dict(stop=["\udfff"]), "stop")):
        r = httpx.post(bytes_server.url + "/v1/completions", headers={"content-type": "application/json"},
                       content=json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 3, **body}))  # \ud800 escaped
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param
    r = httpx.post(bytes_server.url + "/v1/chat/completions", headers={"content-type": "application/json"},
                   content=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x\ud800"}],
                                       "max_tokens": 3}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"


# -- 13. unsupported parameters, Retry-After ------------------------------------------------------------------------
@pytest.mark.parametrize("extra, param", [
    (dict(logprobs=True), "logprobs"), (dict(top_logprobs=2), "top_logprobs"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(response_format={"type": "json_object"}), "response_format"), (dict(presence_penalty=0.5),
                                                                          "presence_penalty"),
])
def test_unsupported_parameters_are_rejected_not_ignored(bytes_server, extra, param):
    with pytest.raises(openai.BadRequestError) as exc:
        bytes_server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=2, **extra)
    assert exc.value.response.json()["error"]["param"] == param
    ok = bytes_server.client().chat.completions.create(  # their defaults are fine
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, logprobs=False,
        response_format={"type": "text"}, presence_penalty=0, frequency_penalty=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_a_full_queue_answers_429_with_retry_after(char_model, tmp_path):
    engine = _engine(char_model, CharTokenizer(), _memory(), max_active=1, max_queue=1, max_new_tokens=400)
    with Server(engine) as srv:
        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(c.post(srv.url + "/v1/completions", json={
                    "model": MODEL, "prompt": f"q{i}", "max_tokens": 400, "temperature": 0}) for i in range(6)))
        answers = asyncio.run(burst())
    busy = [r for r in answers if r.status_code == 429]
    assert busy and all(r.headers.get("retry-after") == "1" for r in busy)
    assert {r.status_code for r in answers} <= {200, 429}


# -- 2. compressed configuration: never a 500 ------------------------------------------------------------------------
def _snapkv_engine(char_model, **kw):
    cfg = dict(cache="method=snapkv budget=0.5 allocation=uniform")
    return _engine(char_model, CharTokenizer(), _memory(), cfg=cfg, **kw)


def test_cache_that_cannot_run_a_prompt_is_a_4xx_not_a_500(char_model):
    with Server(_snapkv_engine(char_model)) as srv:
        for stream in (False, True):
            r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "short prompt",
                                                               "max_tokens": 4, "stream": stream})
            if r.status_code != 200:  # until policies fit small budgets (issue 18): a clear 400
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert err["code"] == "prompt_unsupported_by_cache" and "snapkv" in err["message"]
        long = srv.client().completions.create(model=MODEL, prompt="p" * 300, max_tokens=4, temperature=0)
        assert long.usage.completion_tokens >= 1  # a prompt the budget fits is served
        assert httpx.get(srv.url + "/health").status_code == 200


def test_snapkv_half_budget_short_prompt(char_model):
    with Server(_snapkv_engine(char_model)) as srv:
        client = srv.client()
        for n in (5, 40, 100, 127):
            r = client.completions.create(model=MODEL, prompt="s" * n, max_tokens=4, temperature=0)
            assert r.usage.completion_tokens >= 1
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length")


def test_startup_probe_names_the_shortest_prompt(char_model, tmp_path):
    store = KVStore(_memory(), namespace(model=MODEL), block=8)
    engine = Engine(char_model, CharTokenizer(), store,
                    EngineConfig(model_name=MODEL, cache="method=snapkv budget=0.5 allocation=uniform"))
    shortest, why = engine.shortest_prompt()
    # the server prints a warning when this is > 1: SnapKV's 64-token window needs 128-token prompts at 50% unless
    # the policy fits small budgets (issue 18), in which case every prompt runs
    assert (shortest, why) == (1, "") or (shortest == 128 and "snapkv" in why)
    full = Engine(char_model, CharTokenizer(), store, EngineConfig(model_name=MODEL))
    assert full.shortest_prompt() == (1, "")


# -- 3. body limit and tokenising ---------------------------------------------------------------------------------
class CountingTokenizer(CharTokenizer):
    longest = 0

    def __call__(self, text, **kw):
        CountingTokenizer.longest = max(CountingTokenizer.longest, len(text))
        return super().__call__(text, **kw)


def test_chunked_body_over_the_limit_is_413_and_long_prompts_are_not_tokenised(char_model):
    engine = _engine(char_model, CountingTokenizer(), _memory())
    with Server(engine) as srv:
        big = b'{"model": "%s", "prompt": "%s"}' % (MODEL.encode(), b"x" * (5 << 20))

        def chunks():  # no Content-Length: transfer-encoding chunked
            for i in range(0, len(big), 1 << 16):
                yield big[i:i + (1 << 16)]

        r = httpx.post(srv.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        # under the limit but far beyond the context: rejected before any tokenising, /health answers throughout
        done = threading.Event()
        slowest = []

        def probe():
            while not done.is_set():
                t0 = time.perf_counter()
                assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
                slowest.append(time.perf_counter() - t0)

        t = threading.Thread(target=probe)
        t.start()
        try:
            for _ in range(3):
                r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "y" * (3 << 20)},
                               timeout=60)
                assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        finally:
            done.set()
            t.join()
        assert CountingTokenizer.longest < 2000  # the 3 MB prompt never reached the tokenizer
        assert max(slowest) < 2.0
        ok = srv.client().completions.create(model=MODEL, prompt="fits", max_tokens=2)
        assert ok.usage.prompt_tokens == 5


# -- 4. cache scopes ------------------------------------------------------------------------------------------------
def _two_users(srv, prefix: str, **kw):
    client = srv.client(**kw)
    first = client.completions.create(model=MODEL, prompt=prefix + " guess 1", max_tokens=2, temperature=0,
                                      user="alice")
    srv.engine.store.flush()
    other = client.completions.create(model=MODEL, prompt=prefix + " guess 2", max_tokens=2, temperature=0,
                                      user="mallory")
    srv.engine.store.flush()
    again = client.completions.create(model=MODEL, prompt=prefix + " guess 3", max_tokens=2, temperature=0,
                                      user="alice")
    return first, other, again


def test_cached_kv_is_not_shared_across_users_by_default(char_model):
    prefix = "Alice's PIN is 4711; the server knows it"
    with Server(_engine(char_model, CharTokenizer(), _memory())) as srv:
        first, other, again = _two_users(srv, prefix)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # nothing of alice's is visible to mallory
    assert again.usage.prompt_tokens_details.cached_tokens >= len(prefix)  # alice's own history is reused
    with Server(_engine(char_model, CharTokenizer(), _memory()), cache_scope="global") as srv:
        _, other, _ = _two_users(srv, prefix)
    assert other.usage.prompt_tokens_details.cached_tokens >= len(prefix)  # global: shared, as documented


# -- 5. API keys ----------------------------------------------------------------------------------------------------
def test_api_keys_are_checked_and_namespace_the_cache(char_model):
    keys = ["key-one", "key-two"]
    with Server(_engine(char_model, CharTokenizer(), _memory()), api_keys=keys) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # open: for load balancers
        for path, method in (("/v1/models", "GET"), ("/metrics", "GET"), ("/v1/completions", "POST"),
                             ("/v1/chat/completions", "POST")):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "key-one"}):
                r = httpx.request(method, srv.url + path, headers=headers, json={"model": MODEL, "prompt": "x"})
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            srv.client("nope").models.list()
        assert [m.id for m in srv.client("key-two").models.list().data] == [MODEL]
        prefix = "Key one's secret conversation, long enough"
        one = srv.client("key-one")
        one.completions.create(model=MODEL, prompt=prefix + " a", max_tokens=2, temperature=0, user="bob")
        srv.engine.store.flush()
        forged = srv.client("key-two").completions.create(model=MODEL, prompt=prefix + " b", max_tokens=2,
                                                          temperature=0, user="bob")  # same user field, other key
        assert forged.usage.prompt_tokens_details.cached_tokens == 0
        mine = one.completions.create(model=MODEL, prompt=prefix + " c", max_tokens=2, temperature=0, user="bob")
        assert mine.usage.prompt_tokens_details.cached_tokens >= len(prefix)
        # fairness follows the key, not the client-chosen user field
        assert [r.user for r in srv.engine.seen] == [key_id("key-one"), key_id("key-two"), key_id("key-one")]
        assert srv.metric("squeezekv_requests_total", {"authorization": "Bearer key-one"}) == 3


# -- 6. checksummed headers, tokens compared on every hit ------------------------------------------------------------
def test_an_edited_header_never_serves_one_prompts_kv_for_another(char_model, tmp_path):
    folder = tmp_path / "kv"
    a, b = "The PIN is 1234, do not tell", "The PIN is 1235, do not tell"
    with Server(_engine(char_model, CharTokenizer(), [DiskTier(folder, 64 << 20)])) as srv:
        srv.client().completions.create(model=MODEL, prompt=a, max_tokens=2, temperature=0)
        srv.engine.store.flush()
    (path,) = folder.glob("*.kv")
    data = path.read_bytes()
    tokens_a = ", ".join(str(t) for t in CharTokenizer()(a)["input_ids"])
    tokens_b = ", ".join(str(t) for t in CharTokenizer()(b)["input_ids"])
    assert data.count(tokens_a.encode()) == 1 and len(tokens_a) == len(tokens_b)
    path.write_bytes(data.replace(tokens_a.encode(), tokens_b.encode()))  # the header now claims prompt b
    with Server(_engine(char_model, CharTokenizer(), [DiskTier(folder, 64 << 20)])) as srv:
        assert srv.engine.store.stats["recovered"] == 1
        r = srv.client().completions.create(model=MODEL, prompt=b, max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == 0  # a's KV is not b's
        assert srv.metric('squeezekv_kv_corrupt_total{tier="disk"}') == 1
    with Server(_engine(char_model, CharTokenizer(), _memory())) as fresh:
        ref = fresh.client().completions.create(model=MODEL, prompt=b, max_tokens=4, temperature=0)
    assert r.choices[0].text == ref.choices[0].text


# -- 7. a failing tier is a miss ------------------------------------------------------------------------------------
def test_an_unusable_disk_folder_degrades_to_misses(char_model, tmp_path):
    folder = tmp_path / "kv"
    engine = _engine(char_model, CharTokenizer(), [MemoryTier("cpu", 0, "cpu"), DiskTier(folder, 64 << 20)])
    with Server(engine) as srv:
        client = srv.client()
        msgs = [{"role": "user", "content": "first turn of a conversation"}]
        first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, temperature=0)
        engine.store.flush()
        assert len(list(folder.glob("*.kv"))) == 1
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
        folder.write_bytes(b"")  # the folder is now a file: every read and write fails (even for root)
        msgs += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "second"}]
        for m in (msgs, [{"role": "user", "content": "a new conversation"}], msgs):
            r = client.chat.completions.create(model=MODEL, messages=m, max_tokens=3, temperature=0)
            assert r.usage.prompt_tokens_details.cached_tokens == 0  # served, recomputed
            engine.store.flush()
        assert srv.metric('squeezekv_kv_tier_errors_total{tier="disk"}') >= 2
        assert srv.metric("squeezekv_request_errors_total") == 0


# -- 8, 9. the disk folder: owned, private, only its own files touched ---------------------------------------------
def test_disk_folder_is_locked_private_and_foreign_files_are_kept(char_model, tmp_path):
    folder = tmp_path / "kv"
    folder.mkdir(mode=0o755)
    foreign = {"notes.tmp": b"mine", "backup.kv": b"mine too", "a" * 64 + ".kv": b"not squeezekv's"}
    for name, data in foreign.items():
        (folder / name).write_bytes(data)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    with Server(_engine(char_model, CharTokenizer(), [DiskTier(folder, 64 << 20)])) as srv:
        with pytest.raises(FolderInUse, match="in use"):
            DiskTier(folder, 1 << 20)  # a second server on the same folder is refused
        # a link planted where an older version wrote its temporary file for the entry about to be written
        from squeezekv.store import entry_key

        prompt = "planted links"
        tokens = CharTokenizer()(prompt)["input_ids"]
        root = srv.engine.store.scoped_root(None)
        key = entry_key(tokens, root, 8)  # max_tokens=1: the entry holds exactly the prompt
        os.symlink(outside, folder / f"{key}.{os.getpid()}.tmp")
        srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
        srv.engine.store.flush()
        assert srv.engine.store.usage()["disk"]["entries"] == 1
    assert outside.read_bytes() == b"precious"  # never written through a link
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    entries = [p for p in folder.glob("*.kv") if p.name not in foreign]
    assert len(entries) == 1 and stat.S_IMODE(entries[0].stat().st_mode) == 0o600
    for name, data in foreign.items():  # files it did not write survive the start, the run and the stop
        assert (folder / name).read_bytes() == data
    assert (folder / LOCK_NAME).exists()
    DiskTier(folder, 1 << 20).close()  # released on stop


# -- 10. cancellation on disconnect ---------------------------------------------------------------------------------
def test_an_abandoned_non_streaming_request_stops_generating(tmp_path):
    from conftest import build_model

    model = build_model("llama", layers=4, max_position_embeddings=4096)
    engine = _engine(model, CharTokenizer(), _memory(), max_new_tokens=3000)
    with Server(engine) as srv:
        with pytest.raises(openai.APITimeoutError):
            srv.client(timeout=0.5).completions.create(model=MODEL, prompt="go on and on", max_tokens=3000,
                                                       temperature=0)
        deadline = time.monotonic() + 60
        while engine.active or engine.queue_length:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert srv.metric("squeezekv_cancelled_requests_total") == 1
        assert srv.metric("squeezekv_generated_tokens_total") < 1500  # stopped soon after the client left


# -- 13. connection limits, header deadline and size ----------------------------------------------------------------
def test_idle_and_half_open_connections_cannot_hold_every_slot(char_model):
    engine = _engine(char_model, CharTokenizer(), _memory())
    with Server(engine, uvicorn_kw=dict(max_connections=4, header_timeout=1)) as srv:
        host, port = srv.url.rsplit("/", 1)[1].split(":")
        socks = [socket.create_connection((host, int(port))) for _ in range(4)]
        socks[0].sendall(b"GET /hea")  # half a request line, then silence
        time.sleep(0.3)
        assert httpx.get(srv.url + "/health").status_code == 503  # every slot held: refused, not queued forever
        time.sleep(1.5)
        for s in socks:  # past the header deadline: closed by the server
            s.settimeout(2)
            assert s.recv(100) == b""
            s.close()
        assert httpx.get(srv.url + "/health").status_code == 200
        with socket.create_connection((host, int(port))) as s:  # a 1 MiB header: a 400 answer, not a reset
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
            s.settimeout(5)
            assert s.recv(100).startswith(b"HTTP/1.1 400")


def test_api_keys_come_from_flags_file_and_environment(tmp_path):
    from squeezekv.commands.serve import KEYS_ENV, api_keys

    f = tmp_path / "keys"
    f.write_text("# team keys\nfile-key\n\n  other-key  \n")
    assert api_keys(["flag-key"], str(f), {KEYS_ENV: "env-1, env-2,"}) == ["flag-key", "file-key", "other-key",
                                                                           "env-1", "env-2"]
    assert api_keys(None, None, {}) == []
    with pytest.raises(ValueError, match="cannot be read"):
        api_keys(None, str(tmp_path / "missing"), {})
    with pytest.raises(ValueError, match="out of range"):
        uvicorn_config(None, "127.0.0.1", 1, header_timeout=0)
