"""Chunked prefill: nothing evicted -> the one-pass logits exactly; with eviction the cache never holds more than
budget + chunk tokens, positions-only policies keep the same token indices as a one-pass prefill, and a fraction
budget is a fraction of the whole prompt."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import squeezekv

POLICIES = [p for p in squeezekv.policy_names() if p != "none"]
PROMPT, CHUNK = 40, 12


def _decode(model, cache, logits, steps=6):
    """Greedy steps after a prefill; returns the logits of every step."""
    out = [logits]
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        logits = model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1]
        out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("allocation", ["uniform", "squeeze"])
@pytest.mark.parametrize("method", POLICIES)
def test_large_budget_equals_one_pass(method, allocation, make_model, make_ids, method_params):
    model = make_model("llama")
    ids = make_ids(1, PROMPT)
    full = DynamicCache(config=model.config)
    ref = _decode(model, full, model(input_ids=ids, cache=full, use_cache=True).logits[:, -1])
    cache = squeezekv.make_cache(model, method, 4096, allocation, method_params=method_params(method))
    out = _decode(model, cache, squeezekv.chunked_prefill(model, ids, cache, CHUNK))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", POLICIES)
def test_cache_never_exceeds_budget_plus_chunk(method, make_model, make_ids, method_params):
    model = make_model("llama")
    ids = make_ids(1, PROMPT)
    budget = 10
    cache = squeezekv.make_cache(model, method, budget, "uniform", method_params=method_params(method))
    held, before = [], []
    hooks = [model.model.layers[-1].register_forward_hook(lambda *a: held.append(max(cache.physical_lengths())))]
    for i, layer in enumerate(model.model.layers):  # what each layer holds when a chunk arrives
        hooks.append(layer.self_attn.register_forward_pre_hook(
            lambda *a, i=i: before.append(cache.layers[i].physical_length if cache.layers[i].is_initialized else 0)))
    try:
        squeezekv.chunked_prefill(model, ids, cache, CHUNK)
    finally:
        for h in hooks:
            h.remove()
    assert len(held) == -(-PROMPT // CHUNK)
    assert max(held) <= budget  # after each chunk every layer is back at the budget
    # so a layer attends over at most budget + chunk tokens, and holds the budget at the end
    assert max(before) <= budget and max(before) > 0
    assert all(n == budget for n in cache.physical_lengths())
    assert all(layer.seen == PROMPT for layer in cache.layers)


@pytest.mark.parametrize("method", ["window", "streamingllm"])
def test_positional_policies_keep_same_indices(method, make_model, make_ids, method_params):
    model = make_model("llama")
    ids = make_ids(1, PROMPT)
    one = squeezekv.make_cache(model, method, 10, "uniform", method_params=method_params(method))
    model(input_ids=ids, cache=one, use_cache=True)
    chunked = squeezekv.make_cache(model, method, 10, "uniform", method_params=method_params(method))
    squeezekv.chunked_prefill(model, ids, chunked, CHUNK)
    for a, b in zip(one.layers, chunked.layers):
        assert torch.equal(a.token_idx, b.token_idx)


@pytest.mark.parametrize("allocation", ["uniform", "pyramid", "squeeze"])
def test_fraction_budget_is_of_whole_prompt(allocation, make_model, make_ids):
    model = make_model("llama")
    ids = make_ids(1, PROMPT)
    cache = squeezekv.make_cache(model, "window", 0.5, allocation)
    squeezekv.chunked_prefill(model, ids, cache, CHUNK)
    assert cache.plan.base == PROMPT // 2
    assert cache.plan.total == PROMPT // 2 * model.config.num_hidden_layers
    assert cache.physical_lengths() == list(cache.plan.budgets)


def test_padded_batch_large_budget_equals_one_pass(make_model, make_left_padded):
    model = make_model("llama")
    ids, mask = make_left_padded([PROMPT, PROMPT - 9], PROMPT)
    ref = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    cache = squeezekv.make_cache(model, "snapkv", 4096, "uniform", method_params={"window": 4})
    out = squeezekv.chunked_prefill(model, ids, cache, CHUNK, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_bad_input(make_model, make_ids):
    model = make_model("llama")
    ids = make_ids(1, PROMPT)
    cache = squeezekv.make_cache(model, "h2o", 10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            squeezekv.chunked_prefill(model, ids, cache, bad)
    with pytest.raises(TypeError, match="SqueezeCache"):
        squeezekv.chunked_prefill(model, ids, DynamicCache(config=model.config), 8)
    with pytest.raises(ValueError, match="attention_mask"):
        squeezekv.chunked_prefill(model, ids, cache, 8, attention_mask=torch.ones(1, 3, dtype=torch.long))
    squeezekv.chunked_prefill(model, ids, cache, 8)
    with pytest.raises(ValueError, match="empty cache"):
        squeezekv.chunked_prefill(model, ids, cache, 8)


@pytest.mark.parametrize("method", POLICIES)
def test_chunks_after_eviction_same_in_sdpa_and_eager(method, make_model, make_ids, method_params):
    """A chunk arriving after an eviction attends to the kept past and causally to itself: SDPA (bottom-right causal
    bias, no explicit mask) and the eager reference (explicit per-query masks) give the same logits."""
    model = make_model("llama")
    ids = make_ids(1, PROMPT)
    outs = []
    for backend in ("sdpa", "eager"):
        cache = squeezekv.make_cache(model, method, 10, "uniform", method_params=method_params(method),
                                     attn_backend=backend)
        outs.append(_decode(model, cache, squeezekv.chunked_prefill(model, ids, cache, CHUNK)))
        assert all(n <= 10 + 6 for n in cache.physical_lengths())  # budget + the decoded tokens at most
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_eager_reference_over_several_query_chunks(make_model, make_ids, monkeypatch):
    """The eager path splits long prompts into query chunks whose weights stop at their last query's key: forcing
    tiny chunks must give the one-chunk result (this failed with a shape error before)."""
    import squeezekv.attention_math as attn

    model = make_model("llama")
    ids = make_ids(1, PROMPT)
    ref_cache = squeezekv.make_cache(model, "h2o", 4096, attn_backend="eager")
    ref = model(input_ids=ids, cache=ref_cache).logits
    monkeypatch.setattr(attn, "EAGER_BLOCK", 1)  # one query per chunk
    cache = squeezekv.make_cache(model, "h2o", 4096, attn_backend="eager")
    out = model(input_ids=ids, cache=cache).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.layers[0].scores, ref_cache.layers[0].scores, atol=1e-5, rtol=0)
