"""One CacheSpec behind every entry point: the command line's --cache and flags, squeezekv run's columns, the
server's cache (channel methods included: ``serve --channel kivi``), eval's cells and their records."""

from __future__ import annotations

import threading

import pytest
import torch

import squeezekv
from squeezekv.cli import build_parser
from squeezekv.commands.cache_args import cache_spec, given
from squeezekv.commands.serve import server_cache_spec
from squeezekv.spec import CacheSpec

KIVI = {"bits": 4, "group_size": 8, "residual": 8}


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


def test_cache_text_and_flags_make_one_spec():
    args = _args("run", "--cache", "method=h2o budget=0.3 channel=kivi channel.bits=2", "--budget", "0.2",
                 "--channel-param", "group_size=16", "--allocation", "pyramid", "--evict-every", "4")
    assert cache_spec(args) == CacheSpec(method="h2o", budget=0.2, allocation="pyramid", channel="kivi",
                                         channel_params={"bits": 2, "group_size": 16}, evict_every=4)
    assert cache_spec(_args("run")) == CacheSpec()  # the one default set
    assert cache_spec(_args("run", "--cache", "method=window channel=kivi", "--channel", "none")).channel is None
    assert cache_spec(_args("run", "--budget", "256")).budget == 256
    assert given(_args("run", "--cache", "method=h2o budget=0.3")) == {"method", "budget"}
    assert "budget" not in given(_args("run", "--method", "h2o"))


@pytest.mark.parametrize("argv, fragment", [
    (["--cache", "method=snapkv bits=2"], "key 'bits' is unknown"),
    (["--cache", "budget=0"], "budget 0 is out of range"),
    (["--channel-param", "bits=2"], "given without a channel"),
    (["--cache", "method=nope"], "unknown method 'nope'"),
])
def test_bad_cache_arguments_exit_2_naming_the_value(argv, fragment, capsys):
    from squeezekv.cli import main

    assert main(["run", *argv, "--model", "/does/not/exist"]) == 2
    assert fragment in capsys.readouterr().err


def test_server_cache_spec():
    assert server_cache_spec(_args("serve")) is None  # no cache argument: the full cache
    assert server_cache_spec(_args("serve", "--channel", "kivi", "--channel-param", "bits=2")) == CacheSpec(
        method="none", budget=1.0, channel="kivi", channel_params={"bits": 2})  # the channel alone, every token
    assert server_cache_spec(_args("serve", "--method", "snapkv")) == CacheSpec(method="snapkv")
    assert server_cache_spec(_args("serve", "--cache", "method=h2o budget=0.2 channel=kivi")) == CacheSpec(
        method="h2o", budget=0.2, channel="kivi")


def test_engine_serves_a_kivi_cache_like_generate(make_model, make_ids):
    """``serve --channel kivi``: the engine's answer equals greedy decoding with make_cache of the same spec."""
    from squeezekv.serve import Engine, EngineConfig, GenRequest
    from squeezekv.serve.chartok import CharTokenizer
    from squeezekv.store import KVStore, MemoryTier, namespace

    model = make_model("llama", layers=2, max_position_embeddings=512)
    spec = server_cache_spec(_args("serve", "--channel", "kivi", *sum((["--channel-param", f"{k}={v}"]
                                                                        for k, v in KIVI.items()), [])))
    store = KVStore([MemoryTier("cpu", 1 << 30, "cpu")], namespace(test="kivi"), block=8)
    engine = Engine(model, CharTokenizer(), store, EngineConfig(cache=spec, max_new_tokens=16)).start()
    prompt = make_ids(1, 40, seed=5)[0].tolist()
    done, events = threading.Event(), []

    def emit(ev):
        events.append(ev)
        if ev["type"] != "delta":
            done.set()

    req = GenRequest(prompt=prompt, max_tokens=6, emit=emit)
    engine.submit(req)
    assert done.wait(60) and events[-1]["type"] == "done", events[-1]
    engine.shutdown()
    cache = squeezekv.make_cache(model, spec)
    assert cache.spec == spec and type(cache.layers[0]).__name__ == "KIVILayer"
    out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, cache=cache)
    assert req.generated == out[0, len(prompt):].tolist()


def test_eval_cells_are_specs_and_records_save_them():
    from squeezekv.eval import GridConfig

    cfg = GridConfig(methods=("h2o",), allocations=("pyramid",), budgets=(0.3,), channels=("kivi",),
                     channel_params={"kivi": {"bits": 2}}, prefill_chunk=64)
    cfg.validate()
    cells = [c for c in cfg.cells() if c.method != "full"]
    assert [cfg.spec(c) for c in cells] == [CacheSpec(method="h2o", budget=0.3, allocation="pyramid", channel="kivi",
                                                      channel_params={"bits": 2}, prefill_chunk=64)]
    assert cfg.spec(cfg.cells()[0]) is None  # the full cache


def test_engine_with_a_cache_the_store_cannot_hold_serves_without_reuse(make_model, make_ids):
    """``serve --crosslayer minicache``: requests are answered; the store refuses the layer type once and the engine
    turns multi-turn reuse off (saying why) instead of failing or warning on every request."""
    from squeezekv.serve import Engine, EngineConfig, GenRequest
    from squeezekv.serve.chartok import CharTokenizer
    from squeezekv.store import KVStore, MemoryTier, namespace

    model = make_model("llama", layers=4, max_position_embeddings=512)
    spec = server_cache_spec(_args("serve", "--crosslayer", "minicache"))
    assert spec == CacheSpec(method="none", budget=1.0, crosslayer="minicache")
    store = KVStore([MemoryTier("cpu", 1 << 30, "cpu")], namespace(test="minicache"), block=8)
    engine = Engine(model, CharTokenizer(), store, EngineConfig(cache=spec, max_new_tokens=16)).start()
    for seed in (1, 2):
        done = threading.Event()
        events: list = []
        req = GenRequest(prompt=make_ids(1, 30, seed=seed)[0].tolist(), max_tokens=4,
                         emit=lambda ev, e=events, d=done: (e.append(ev), ev["type"] != "delta" and d.set()))
        engine.submit(req)
        assert done.wait(60) and events[-1]["type"] == "done", events[-1]
        assert len(req.generated) == 4
    engine.shutdown()
    assert engine.reuse_off is not None and "MiniCache" in engine.reuse_off or "minicache" in engine.reuse_off.lower()


def test_bench_caches_are_specs():
    from squeezekv.bench import BenchCache

    entry = BenchCache.parse({"cache": "method=window evict_every=16", "decoder": "graph"})
    assert entry.spec == CacheSpec(method="window", evict_every=16) and entry.decoder == "graph"
    assert entry.name == "method=window evict_every=16 decoder=graph"
    assert BenchCache.parse("full").spec is None
    for bad, fragment in (("window:16:graph", "unknown method .window:16:graph."),
                          ({"cache": "full", "decoder": "graph"}, "decodes eagerly"),
                          ({"cache": "method=h2o", "decoder": "jit"}, "decoder='jit'"),
                          ({"method": "h2o"}, "must be 'full', a cache spec")):
        with pytest.raises(ValueError, match=fragment):
            BenchCache.parse(bad)
