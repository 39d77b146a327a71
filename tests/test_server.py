"""``squeezekv serve`` through the real ``openai`` client against uvicorn on 127.0.0.1: chat and completions,
streaming and not, reuse across turns, metrics, and bad requests answered with 4xx in OpenAI's error format."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402

from squeezekv.serve import Engine, EngineConfig, create_app  # noqa: E402
from squeezekv.serve.chartok import CharTokenizer  # noqa: E402
from squeezekv.store import DiskTier, KVStore, MemoryTier, namespace  # noqa: E402

MODEL = "tiny-llama"


def start_in_thread(server: "uvicorn.Server") -> threading.Thread:
    """Run ``server`` in a daemon thread; return once it has started (RuntimeError after 30 s or if it died)."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return thread


class Server:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a thread; stops on :meth:`stop`."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                   lifespan="on", timeout_graceful_shutdown=5))
        self.thread = start_in_thread(self.server)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_engine(build_model, tmp_path, **cfg):
    model = build_model("llama", layers=2, max_position_embeddings=1024)
    store = KVStore([MemoryTier("gpu", 64 << 10, "cpu"), MemoryTier("cpu", 256 << 10, "cpu"),
                     DiskTier(tmp_path / "kv", 64 << 20)], namespace(model=MODEL, **cfg), block=8)
    config = EngineConfig(model_name=MODEL, max_new_tokens=64, **cfg)
    return Engine(model, CharTokenizer(), store, config).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import build_model

    engine = make_engine(build_model, tmp_path_factory.mktemp("serve"))
    srv = Server(create_app(engine))
    srv.engine = engine
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ('squeezekv_kv_hits_total{tier="disk"}', 'squeezekv_kv_bytes{tier="gpu"}', "squeezekv_queue_length",
                 'squeezekv_ttft_seconds_bucket{le="+Inf"}'):
        assert name in text


def test_chat_non_streaming_and_streaming_agree(client):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].finish_reason in ("length", "stop")
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 10
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_completions_streaming_and_not(client):
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens <= 10
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text


def test_second_turn_reuses_the_first_turns_kv(server, client):
    msgs = [{"role": "system", "content": "Reuse test: the history is stored."},
            {"role": "user", "content": "First question?"}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    server.engine.store.flush()  # the save is asynchronous
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "Second question?"}]
    second = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # everything fed during turn 1 (its prompt and all generated tokens but the last) is reused
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 1
    hits = sum(server.engine.store.stats[f"hit_{t}"] for t in ("gpu", "cpu", "disk"))
    assert hits >= 1


def test_sampling_with_a_seed_is_reproducible(client):
    kw = dict(model=MODEL, prompt="abc", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(model="gpt-17"), 404, "model"),
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(max_tokens=100000), 400, "max_tokens"),
    (dict(temperature=-1), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(n=3), 400, "n"),
    (dict(messages=[]), 400, "messages"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
    (dict(messages=[{"role": "user", "content": "x" * 1100}]), 400, "messages"),
])
def test_bad_requests_get_openai_errors(client, server, kwargs, status, param):
    args = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    args.update(kwargs)
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(**args)
    assert exc.value.status_code == status
    body = exc.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200  # still up


def test_malformed_json_and_oversized_body(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "tiny-llama", "messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (5 << 20),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [5, 999]})
    assert r.status_code == 400 and "999" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/nope").status_code == 404
    assert httpx.get(server.url + "/health").status_code == 200


def test_too_many_tokens_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="y" * 1000, max_tokens=60)
    assert exc.value.response.json()["error"]["code"] == "context_length_exceeded"


def test_metrics_count_hits_and_ttft(server, client):
    client.completions.create(model=MODEL, prompt="metrics please", max_tokens=2, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["squeezekv_ttft_seconds_count"] >= 1
    assert values["squeezekv_requests_total"] >= 1
    assert sum(values[f'squeezekv_kv_hits_total{{tier="{t}"}}'] for t in ("gpu", "cpu", "disk")) >= 1
    assert values['squeezekv_kv_bytes{tier="gpu"}'] + values['squeezekv_kv_bytes{tier="cpu"}'] > 0
    assert all(values[f'squeezekv_engine_seconds_total{{phase="{p}"}}'] > 0 for p in ("prefill", "sample", "step"))


def test_metrics_keep_the_slowest_iterations_phases():
    from squeezekv.serve.metrics import Metrics

    m = Metrics()
    for i in range(50):
        m.iteration({"prefill": i / 100, "step": 0.01}, keep=4)
    slow = m.slowest()
    assert [round(x["total"], 6) for x in slow] == [0.5, 0.49, 0.48, 0.47]
    assert slow[0]["iteration"] == 50 and slow[0]["prefill"] == 0.49
    assert round(m.phases["step"], 6) == 0.5


# -- the command line ---------------------------------------------------------------------------------------------
def test_serve_cli_user_errors_exit_2_without_traceback(capsys, tmp_path):
    from squeezekv.cli import main

    for argv, fragment in ((["serve", "--cpu-cache", "3parsecs"], "is not a size"),
                           (["serve", "--disk-cache", "nowhere"], "must look like DIR:SIZE"),
                           (["serve", "--budget", "0", "--model", str(tmp_path)], "budget 0 is out of range")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err


def test_serve_cli_tiers(tmp_path):
    from squeezekv.commands.serve import build_tiers

    tiers = build_tiers("8GiB", "32GiB", f"{tmp_path}/kv:200GiB", "cpu")
    assert [(t.name, t.capacity) for t in tiers] == [("cpu", 32 << 30), ("disk", 200 << 30)]  # no GPU on a CPU
    assert (tmp_path / "kv").is_dir()


def test_max_tokens_defaults_to_what_the_context_leaves(server, client):
    # the server's limit is 64 new tokens and the context 1024: a 1000-token prompt may still ask for the default
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "z" * 990}], temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 1024
    assert r.usage.completion_tokens <= 1024 - r.usage.prompt_tokens
