"""``squeezekv serve`` end to end: a tiny random checkpoint with a real Hugging Face tokenizer (character-level, with
a chat template) saved to a folder, the CLI started as a subprocess on 127.0.0.1, two chat turns through the openai
client (the second reuses the first's KV), metrics, then a clean shutdown on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


def _save_checkpoint(folder) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import build_model

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(i): i for i in range(3, 128)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  chat_template=TEMPLATE)
    build_model("llama", layers=2, max_position_embeddings=1024).save_pretrained(folder)
    tok.save_pretrained(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_two_turns_and_stops_cleanly(tmp_path):
    ckpt = tmp_path / "tiny"
    _save_checkpoint(ckpt)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SQUEEZEKV_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "squeezekv.cli", "serve", "--model", str(ckpt), "--served-model-name", "tiny",
         "--device", "cpu", "--cpu-cache", "64KiB", "--disk-cache", f"{tmp_path}/kv:64MiB", "--block", "8",
         "--max-tokens", "16", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        msgs = [{"role": "system", "content": "A tiny model."}, {"role": "user", "content": "Hello there?"}]
        first = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
        msgs += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And again?"}]
        second = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=msgs, max_tokens=17)  # over --max-tokens
        assert "squeezekv_kv_hits_total" in httpx.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - only if shutdown hangs
            proc.kill()
            raise
    out = proc.stdout.read()
    assert "Traceback" not in out, out


def _start(ckpt, tmp_path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SQUEEZEKV_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "squeezekv.cli", "serve", "--model", str(ckpt), "--served-model-name", "tiny",
         "--device", "cpu", "--max-active", "1", "--max-tokens", "1000", "--port", str(port), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait_up(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def test_shutdown_is_bounded_and_a_second_sigterm_stops_at_once(tmp_path):
    import threading

    ckpt = tmp_path / "tiny"
    _save_checkpoint(ckpt)
    # one server drains for at most 2 s; the other would wait a minute, but gets a second SIGTERM
    servers = [_start(ckpt, tmp_path, "--shutdown-timeout", "2"), _start(ckpt, tmp_path, "--shutdown-timeout", "60")]
    try:
        for proc, url in servers:
            _wait_up(proc, url)

        def long_request(url: str) -> None:  # 8 x 1000 tokens, one at a time: far longer than the drain deadline
            try:
                httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "go", "max_tokens": 1000,
                                                          "temperature": 0}, timeout=120)
            except httpx.HTTPError:
                pass

        clients = [threading.Thread(target=long_request, args=(url,), daemon=True)
                   for _, url in servers for _ in range(8)]
        for t in clients:
            t.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        for proc, _ in servers:
            proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        servers[1][0].send_signal(signal.SIGTERM)  # the second one: stop now
        for proc, _ in servers:
            proc.wait(timeout=20)
        assert time.monotonic() - t0 < 12
    finally:
        for proc, _ in servers:
            if proc.poll() is None:  # pragma: no cover - only if shutdown hangs
                proc.kill()
    for proc, _ in servers:
        out = proc.stdout.read()
        assert "Traceback" not in out, out
