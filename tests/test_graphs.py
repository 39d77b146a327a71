"""The static-budget decode path (fixed shapes over pre-allocated buffers, what CUDA graphs replay) computes the same
as the dynamic cache evicting every `chunk` steps."""

from __future__ import annotations

import pytest
import torch

import squeezekv
from squeezekv.graphs import GraphDecoder

CHUNK, STEPS, PROMPT = 4, 11, 24


def _decode_dynamic(model, ids, method, allocation, budget):
    cache = squeezekv.make_cache(model, method, budget, allocation, evict_every=CHUNK)
    logits = model(ids, cache=cache).logits[:, -1]
    out = []
    for _ in range(STEPS):
        nxt = logits.argmax(-1, keepdim=True)
        logits = model(nxt, cache=cache).logits[:, -1]
        out.append(logits)
    return torch.stack(out), cache


def _decode_static(model, ids, method, allocation, budget):
    cache = squeezekv.make_cache(model, method, budget, allocation, evict_every=CHUNK)
    logits = model(ids, cache=cache).logits[:, -1]
    dec = GraphDecoder(model, cache, chunk=CHUNK, use_graph=False)
    out = []
    for _ in range(STEPS):
        nxt = logits.argmax(-1, keepdim=True)
        logits = dec.step(nxt)
        out.append(logits)
    return torch.stack(out), dec.close()


@pytest.mark.parametrize("allocation", ["uniform", "squeeze"])
@pytest.mark.parametrize("method", ["window", "streamingllm", "h2o"])
def test_static_steps_equal_dynamic_eviction(method, allocation, make_model, make_ids):
    model = make_model("llama")
    ids = make_ids(2, PROMPT)
    ref, ref_cache = _decode_dynamic(model, ids, method, allocation, 16)
    got, cache = _decode_static(model, ids, method, allocation, 16)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    for a, b in zip(cache.layers, ref_cache.layers):
        assert a.seen == b.seen == PROMPT + STEPS
        assert torch.equal(a.token_idx, b.token_idx)
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-5)
        if b.scores is not None:
            torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    # the cache goes on in the dynamic mode after close()
    nxt = got[-1].argmax(-1, keepdim=True)
    torch.testing.assert_close(model(nxt, cache=cache).logits, model(nxt, cache=ref_cache).logits, rtol=0, atol=1e-5)


def test_static_buffers_do_not_move(make_model, make_ids):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "window", 10, "uniform", evict_every=CHUNK)
    logits = model(make_ids(1, PROMPT), cache=cache).logits[:, -1]
    dec = GraphDecoder(model, cache, chunk=CHUNK, use_graph=False)
    ptrs = {layer.keys.data_ptr() for layer in cache.layers}
    for _ in range(2 * CHUNK + 1):
        logits = dec.step(logits.argmax(-1, keepdim=True))
        assert {layer.keys.data_ptr() for layer in cache.layers} == ptrs  # captured addresses stay valid
    assert all(layer.keys.shape[2] == 10 + CHUNK for layer in cache.layers)


def test_graph_decoder_rejects_what_it_cannot_do(make_model, make_ids, make_left_padded):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "window", 10, "uniform")
    with pytest.raises(ValueError, match="prefill"):
        GraphDecoder(model, cache)
    snap = squeezekv.make_cache(model, "snapkv", 10, "uniform", method_params={"window": 4})
    model(make_ids(1, PROMPT), cache=snap)
    with pytest.raises(ValueError, match="keeps evicting"):
        GraphDecoder(model, snap)
    padded = squeezekv.make_cache(model, "window", 10, "uniform")
    ids, mask = make_left_padded([PROMPT, 12], PROMPT)
    model(ids, attention_mask=mask, cache=padded)
    with pytest.raises(ValueError, match="padding"):
        GraphDecoder(model, padded)
    with pytest.raises(ValueError, match="chunk"):
        GraphDecoder(model, padded, chunk=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager_static(make_model, make_ids):
    model = make_model("llama").cuda()
    ids = make_ids(2, PROMPT).cuda()
    outs = []
    for use_graph in (False, True):
        cache = squeezekv.make_cache(model, "h2o", 10, "uniform", evict_every=CHUNK)
        logits = model(ids, cache=cache).logits[:, -1]
        dec = GraphDecoder(model, cache, chunk=CHUNK, use_graph=use_graph)
        steps = []
        for _ in range(STEPS):
            logits = dec.step(logits.argmax(-1, keepdim=True))
            steps.append(logits)
        outs.append(torch.stack(steps))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-4)
