"""Prefill chunks inside the decode runtime's step (``DecodeRuntime.step_chunk``): a prompt fed to its pool slot a
chunk at a time, in the same forward as the other slots' decode tokens, gives what the eager full cache gives --
the chunk's last logits equal a whole-prompt prefill's, the decoding rows' logits equal their eager decode, and the
slot then decodes (and exports) like a slot admitted from an eager prefill."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from squeezekv.runtime.pool import KVPool
from squeezekv.runtime.runtime import DecodeRuntime

CAP = 64
ATOL = 1e-5


def _runtime(model, slots=3, chunk=8, cap=CAP):
    cfg = model.config
    pool = KVPool([cap] * cfg.num_hidden_layers, slots, cfg.num_key_value_heads,
                  cfg.hidden_size // cfg.num_attention_heads)
    return DecodeRuntime(model, pool, "none", 1, prefill_chunk=chunk)


def _eager(model, ids):
    cache = DynamicCache(config=model.config)
    logits = model(ids, cache=cache).logits[0, -1]  # [vocab]
    return cache, logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("prefix", [0, 5])
def test_chunked_prefill_in_the_step_equals_the_eager_full_cache(arch, prefix, make_model, make_ids):
    model = make_model(arch, layers=2)
    rt = _runtime(model)
    running = make_ids(1, 11, seed=3)
    prompt = make_ids(1, 21, seed=4)  # 8 + 8 + 5 tokens (less the prefix)
    # a request already decoding in slot a, its eager twin beside it
    ref_a, logits_a = _eager(model, running)
    a = rt.join(_eager(model, running)[0])
    # the new request: its prefix (as if restored from the store) in the slot, the rest fed in chunks
    b = rt.open(_eager(model, prompt[:, :prefix])[0] if prefix else None)
    want_cache, want_b = _eager(model, prompt)
    rest = prompt[0, prefix:]
    tok_a = logits_a.argmax()
    for start in range(0, rest.shape[0], 8):
        got_a, got_b = rt.step_chunk([a], tok_a.view(1), b, rest[start:start + 8])
        ref = model(tok_a.view(1, 1), cache=ref_a).logits[0, -1]
        torch.testing.assert_close(got_a[0], ref, rtol=0, atol=ATOL)
        tok_a = ref.argmax()
    torch.testing.assert_close(got_b, want_b, rtol=0, atol=ATOL)
    assert int(rt.pool.host_seen[b]) == prompt.shape[1] == int(rt.pool.seen[b])
    assert (rt.pool.host_lengths[:, b] == prompt.shape[1]).all()
    assert (rt.pool.lengths[:, b] == prompt.shape[1]).all()
    # then both decode together, as their eager caches do
    tok_b = want_b.argmax()
    for _ in range(3):
        got = rt.step([a, b], torch.stack([tok_a, tok_b]))
        ref_la = model(tok_a.view(1, 1), cache=ref_a).logits[0, -1]
        ref_lb = model(tok_b.view(1, 1), cache=want_cache).logits[0, -1]
        torch.testing.assert_close(got[0], ref_la, rtol=0, atol=ATOL)
        torch.testing.assert_close(got[1], ref_lb, rtol=0, atol=ATOL)
        tok_a, tok_b = ref_la.argmax(), ref_lb.argmax()
    # the slot exports the eager cache's state
    out = DynamicCache(config=model.config)
    for layer, ref in zip(out.layers, want_cache.layers):
        layer.lazy_initialization(ref.keys, ref.values)
    rt.pool.export(b, out)
    for layer, ref in zip(out.layers, want_cache.layers):
        torch.testing.assert_close(layer.keys, ref.keys, rtol=0, atol=ATOL)
        torch.testing.assert_close(layer.values, ref.values, rtol=0, atol=ATOL)


def test_a_chunk_alone_and_a_batch_of_decode_rows(make_model, make_ids):
    """No decode rows (a chunk alone), then several decode rows with one chunk: the other slots are untouched."""
    model = make_model("llama", layers=2)
    rt = _runtime(model, slots=4)
    prompts = [make_ids(1, n, seed=10 + n) for n in (6, 9, 13)]
    refs = [_eager(model, p) for p in prompts]
    slots = [rt.join(_eager(model, p)[0]) for p in prompts[:2]]
    c = rt.open()
    _, first = rt.step_chunk([], torch.empty(0, dtype=torch.long), c, prompts[2][0, :8])
    toks = [r[1].argmax() for r in refs[:2]]
    got, last = rt.step_chunk(slots, torch.stack(toks), c, prompts[2][0, 8:])
    torch.testing.assert_close(last, refs[2][1], rtol=0, atol=ATOL)
    for i in range(2):
        ref = model(toks[i].view(1, 1), cache=refs[i][0]).logits[0, -1]
        torch.testing.assert_close(got[i], ref, rtol=0, atol=ATOL)
    assert first.shape == last.shape


def test_step_chunk_rejects_bad_input(make_model, make_ids):
    model = make_model("llama", layers=2)
    rt = _runtime(model, slots=2, chunk=8, cap=16)
    a = rt.open()
    with pytest.raises(ValueError, match="out of range: 1..prefill_chunk=8"):
        rt.step_chunk([], torch.empty(0, dtype=torch.long), a, make_ids(1, 9)[0])
    with pytest.raises(ValueError, match="distinct"):
        rt.step_chunk([a], torch.tensor([3]), a, make_ids(1, 4)[0])
    with pytest.raises(ValueError, match="holds no request"):
        rt.step_chunk([], torch.empty(0, dtype=torch.long), 1, make_ids(1, 4)[0])
    rt.step_chunk([], torch.empty(0, dtype=torch.long), a, make_ids(1, 8)[0])
    rt.step_chunk([], torch.empty(0, dtype=torch.long), a, make_ids(1, 8)[0])
    with pytest.raises(ValueError, match="is full in layer 0"):
        rt.step_chunk([], torch.empty(0, dtype=torch.long), a, make_ids(1, 1)[0])
    cfg = model.config
    pool = KVPool([4] * cfg.num_hidden_layers, 2, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
    with pytest.raises(ValueError, match="at most the smallest layer capacity 4"):
        DecodeRuntime(model, pool, "none", 1, prefill_chunk=8)
    with pytest.raises(ValueError, match="policy 'none'"):
        DecodeRuntime(model, KVPool([16] * cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 16), "window", 1,
                      prefill_chunk=8)
    plain = DecodeRuntime(model, KVPool([16] * cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 16), "none", 1)
    with pytest.raises(ValueError, match="without prefill_chunk"):
        plain.open()


def test_warm_builds_every_bucket_a_server_steps_through(make_model):
    model = make_model("llama", layers=2)
    rt = _runtime(model, slots=5)
    assert rt.warm(5) == [1, 2, 4, 8]
    assert sorted(rt._buckets) == [1, 2, 4, 8] and sorted(rt._mixed) == [0, 1, 2, 4, 8]
    with pytest.raises(ValueError, match="rows=6 is out of range: 1..5"):
        rt.warm(6)
