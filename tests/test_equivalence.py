"""With a budget larger than the sequence nothing is evicted: every method must reproduce the full-cache model exactly
(same greedy tokens, logits/scores of the prefill and of every decoding step equal to 1e-5 in float32)."""

from __future__ import annotations

import pytest
import torch

import squeezekv

POLICIES = squeezekv.policy_names()
ALLOCATIONS = squeezekv.allocation_names()
OTHER_ARCHS = ["mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]

PROMPT = 24
NEW = 20
# pyramid's smallest layer gets about BIG / 20 = 205 tokens, far more than PROMPT + NEW
BIG = 4096


def _compare(model, ids, mask, method, allocation, run_greedy, same_generation, method_params, **cache_kwargs):
    ref = run_greedy(model, ids, mask, new_tokens=NEW)  # stock model, its own DynamicCache
    cache = squeezekv.make_cache(model, method, BIG, allocation, method_params=method_params(method), **cache_kwargs)
    assert model.config._attn_implementation == "squeezekv"
    out = run_greedy(model, ids, mask, cache=cache, new_tokens=NEW)
    same_generation(ref, out)
    # nothing a query can see was evicted: every managed layer holds the whole sequence but the last generated token,
    # a sliding-window layer (budget capped at window - 1) the window - 1 newest of them
    assert cache.plan is not None
    seen = PROMPT + NEW - 1
    for i in cache.managed:
        layer = cache.layers[i]
        window = layer.sliding_window
        assert layer.seen == seen
        if window and method != "none":
            assert cache.plan[i] == window - 1
            expected = torch.arange(seen - window + 1, seen, dtype=torch.int32)
        else:
            assert cache.plan[i] > PROMPT + NEW
            expected = torch.arange(seen, dtype=torch.int32)
        assert layer.physical_length == expected.numel()
        assert torch.equal(layer.token_idx, expected.expand_as(layer.token_idx))
    return cache


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("method", POLICIES)
def test_llama_batch1_all_combinations(method, allocation, make_model, make_ids, run_greedy, same_generation,
                                       method_params):
    model = make_model("llama")
    ids = make_ids(1, PROMPT)
    _compare(model, ids, None, method, allocation, run_greedy, same_generation, method_params)


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("method", POLICIES)
def test_llama_left_padded_batch3_all_combinations(method, allocation, make_model, make_left_padded, run_greedy,
                                                   same_generation, method_params):
    model = make_model("llama")
    ids, mask = make_left_padded([PROMPT, 17, 9], PROMPT)
    _compare(model, ids, mask, method, allocation, run_greedy, same_generation, method_params)


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_other_architectures_batch1(arch, make_model, make_ids, run_greedy, same_generation, method_params):
    model = make_model(arch)
    ids = make_ids(1, PROMPT)
    cache = _compare(model, ids, None, "h2o", "squeeze", run_greedy, same_generation, method_params)
    assert len(cache.plan.details["importance"]) == len(cache.managed)


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_other_architectures_left_padded_batch2(arch, make_model, make_left_padded, run_greedy, same_generation,
                                                method_params):
    model = make_model(arch)
    ids, mask = make_left_padded([PROMPT, 13], PROMPT)
    _compare(model, ids, mask, "h2o", "squeeze", run_greedy, same_generation, method_params)


@pytest.mark.parametrize("arch", ["mistral", "gemma3_text"])
@pytest.mark.parametrize("method", POLICIES)
def test_sliding_window_architectures_every_policy(arch, method, make_model, make_left_padded, run_greedy,
                                                   same_generation, method_params):
    # the sliding window (8) is much smaller than the sequence (44): the window must be applied exactly
    model = make_model(arch)
    ids, mask = make_left_padded([PROMPT, 15], PROMPT)
    _compare(model, ids, mask, method, "uniform", run_greedy, same_generation, method_params)


def test_gemma3_sliding_layers_are_left_to_transformers(make_model, make_ids, run_greedy, method_params):
    model = make_model("gemma3_text")
    cache = squeezekv.make_cache(model, "h2o", BIG, "uniform")
    types = model.config.layer_types
    assert cache.managed == tuple(i for i, t in enumerate(types) if t == "full_attention")
    run_greedy(model, make_ids(1, PROMPT), cache=cache, new_tokens=NEW)
    # a budget above the model's context is capped at it (recorded in the plan)
    context = model.config.max_position_embeddings
    assert cache.plan.budgets == tuple(context if t == "full_attention" else None for t in types)
    assert cache.plan.details["capped_at_context"] == context
    window = model.config.sliding_window
    assert cache.physical_lengths() == [window - 1 if t == "sliding_attention" else PROMPT + NEW - 1 for t in types]


@pytest.mark.parametrize("method", POLICIES)
@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "leftpad3"])
def test_eager_model_uses_eager_backend(method, padded, make_model, make_ids, make_left_padded, run_greedy,
                                        same_generation, method_params):
    model = make_model("llama", attn="eager")
    assert model.config._attn_implementation == "eager"
    if padded:
        ids, mask = make_left_padded([PROMPT, 20, 11], PROMPT)
    else:
        ids, mask = make_ids(1, PROMPT), None
    ref = run_greedy(model, ids, mask, new_tokens=NEW)  # stock eager attention
    cache = squeezekv.make_cache(model, method, BIG, "pyramid", method_params=method_params(method))
    assert cache.attn_backend == "eager"  # make_cache remembered the model's implementation
    same_generation(ref, run_greedy(model, ids, mask, cache=cache, new_tokens=NEW))
    squeezekv.detach(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_explicit_backend_on_sdpa_model(backend, make_model, make_left_padded, run_greedy, same_generation):
    model = make_model("llama")
    ids, mask = make_left_padded([PROMPT, 10], PROMPT)
    ref = run_greedy(model, ids, mask, new_tokens=NEW)
    cache = squeezekv.make_cache(model, "window", BIG, "uniform", attn_backend=backend)
    assert cache.attn_backend == backend
    same_generation(ref, run_greedy(model, ids, mask, cache=cache, new_tokens=NEW))


def test_default_backend_is_sdpa_for_sdpa_model(make_model):
    model = make_model("llama")
    assert squeezekv.make_cache(model, "window", 8).attn_backend == "sdpa"
    # a second make_cache on the attached model still remembers the original implementation
    assert squeezekv.make_cache(model, "window", 8).attn_backend == "sdpa"


def test_eager_and_sdpa_backends_agree_after_eviction(make_model, make_ids):
    """Same compressed cache contents, same logits whichever backend computes the attention."""
    ids = make_ids(1, 30)
    logits = {}
    for backend in ("sdpa", "eager"):
        model = make_model("llama")
        cache = squeezekv.make_cache(model, "streamingllm", 12, "uniform", attn_backend=backend)
        out = [model(ids, cache=cache).logits[:, -1]]
        for t in range(5):
            nxt = make_ids(1, 1, seed=100 + t)
            out.append(model(nxt, cache=cache).logits[:, -1])
        logits[backend] = torch.cat(out)
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=0)


def test_attached_model_without_squeezekv_cache_is_unchanged(make_model, make_left_padded, run_greedy,
                                                             same_generation):
    """After attach, generating with transformers' own cache still computes what the stock model computes."""
    model = make_model("llama")
    ids, mask = make_left_padded([PROMPT, 12], PROMPT)
    ref = run_greedy(model, ids, mask, new_tokens=8)
    squeezekv.attach(model)
    same_generation(ref, run_greedy(model, ids, mask, new_tokens=8))
    squeezekv.detach(model)
    assert model.config._attn_implementation == "sdpa"
    same_generation(ref, run_greedy(model, ids, mask, new_tokens=8))


def test_detach_removes_hooks(make_model):
    model = make_model("llama")
    before = [(len(l._forward_pre_hooks), len(l.self_attn._forward_hooks)) for l in model.model.layers]
    squeezekv.make_cache(model, "h2o", 8, "squeeze")
    squeezekv.attach(model)  # idempotent: hooks are not installed twice
    during = [(len(l._forward_pre_hooks), len(l.self_attn._forward_hooks)) for l in model.model.layers]
    assert during == [(a + 1, b + 1) for a, b in before]
    squeezekv.detach(model)
    assert [(len(l._forward_pre_hooks), len(l.self_attn._forward_hooks)) for l in model.model.layers] == before
    assert model.config._attn_implementation == "sdpa"


# budgets that keep at least the last 8 tokens (Mistral's sliding window) whatever else each policy evicts
_LOSSLESS_FOR_WINDOW_8 = {
    "window": (10, {}),
    "streamingllm": (14, {}),  # 4 sinks + 10 recent
    "h2o": (20, {}),  # 10 recent
    "snapkv": (12, {"window": 8}),  # observation window of 8 kept; decoded tokens appended
}


@pytest.mark.parametrize("method", POLICIES)
def test_mistral_eviction_outside_the_sliding_window_is_lossless(method, make_model, make_left_padded, run_greedy,
                                                                 same_generation):
    """Mistral attends only to its last 8 tokens: a policy that always keeps them evicts for real (the cache is
    smaller than the sequence) yet must reproduce the stock model exactly."""
    if method not in _LOSSLESS_FOR_WINDOW_8:
        pytest.skip(f"no lossless budget known for {method!r}")
    budget, params = _LOSSLESS_FOR_WINDOW_8[method]
    model = make_model("mistral", initializer_range=0.2)
    assert model.config.sliding_window == 8
    ids, mask = make_left_padded([PROMPT, 18, 13], PROMPT, seed=5)
    ref = run_greedy(model, ids, mask, new_tokens=NEW)
    cache = squeezekv.make_cache(model, method, budget, "uniform", method_params=params)
    out = run_greedy(model, ids, mask, cache=cache, new_tokens=NEW)
    same_generation(ref, out, atol=5e-5)
    assert all(layer.physical_length < PROMPT + NEW - 1 for layer in cache.layers)  # really evicted


@pytest.mark.parametrize("method", POLICIES)
def test_chunked_prefill_without_eviction(method, make_model, make_left_padded, method_params):
    """A prompt fed in two chunks, then single tokens, gives the stock model's logits over the whole sequence."""
    ids, mask = make_left_padded([PROMPT, 16], PROMPT, seed=8)
    model = make_model("llama")
    ref = model(ids, attention_mask=mask).logits  # stock, no cache
    cache = squeezekv.make_cache(model, method, BIG, "uniform", method_params=method_params(method))
    parts = [model(ids[:, :15], attention_mask=mask[:, :15], cache=cache).logits,
             model(ids[:, 15:20], attention_mask=mask[:, :20], cache=cache).logits]
    for t in range(20, PROMPT):
        parts.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits)
    got = torch.cat(parts, dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
    assert cache.get_seq_length() == PROMPT



def test_none_policy_keeps_every_token_and_holds_full_bytes(make_model, make_ids):
    """The 'none' baseline never evicts, whatever the budget: it holds exactly the full cache's keys and values."""
    from transformers import DynamicCache

    model = make_model("llama")
    ids = make_ids(1, PROMPT)
    full = DynamicCache(config=model.config)
    model(input_ids=ids, cache=full, use_cache=True)
    cache = squeezekv.make_cache(model, "none", budget=2)
    model(input_ids=ids, cache=cache, use_cache=True)
    assert cache.physical_lengths() == [PROMPT] * model.config.num_hidden_layers
    assert cache.kv_nbytes() == squeezekv.dynamic_cache_nbytes(full)
