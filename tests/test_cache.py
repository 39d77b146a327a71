"""The compressed cache's memory accounting and positions: evicted tokens are really freed, and the model keeps
using the true positions of the tokens it has seen."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import squeezekv
from squeezekv import BudgetPlan, SqueezeLayer

POLICIES = [p for p in squeezekv.policy_names() if p != "none"]  # the ones that evict (none: tests/test_equivalence.py)
ALLOCATIONS = squeezekv.allocation_names()
ALLOC_PARAMS = {"pyramid": {"beta": 2.0}, "squeeze": {"p": 0.5}}
#: policies known to keep a float32 score per held token
SCORED = {"h2o": True, "snapkv": True, "window": False, "streamingllm": False}

PROMPT = 32
HKV, HEAD_DIM, LAYERS = 2, 16, 4


def _params(method):
    return {"window": 4} if method == "snapkv" else {}


def _expected_layer_bytes(batch, budget, scored, elsize=4):
    per_token = 2 * HEAD_DIM * elsize + 4 + (4 if scored else 0)  # keys + values, int32 token_idx, float32 score
    return batch * HKV * budget * per_token


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("method", POLICIES)
def test_nbytes_after_compression(method, allocation, make_model, make_ids):
    batch = 2
    ids = make_ids(batch, PROMPT)
    stock = make_model("llama")
    full = DynamicCache(config=stock.config)
    stock(ids, cache=full)
    full_bytes = squeezekv.dynamic_cache_nbytes(full)
    assert full_bytes == LAYERS * batch * HKV * PROMPT * 2 * HEAD_DIM * 4

    model = make_model("llama")
    base = 12
    cache = squeezekv.make_cache(model, method, base, allocation, method_params=_params(method),
                                 allocation_params=ALLOC_PARAMS.get(allocation))
    model(ids, cache=cache)
    plan = cache.plan
    scored = SCORED.get(method, cache.policy.uses_scores)
    assert cache.policy.uses_scores == scored
    assert plan.total == base * LAYERS
    assert all(b < PROMPT for b in plan.budgets)
    assert cache.physical_lengths() == list(plan.budgets)
    expected = [_expected_layer_bytes(batch, b, scored) for b in plan.budgets]
    assert cache.layer_nbytes() == expected
    assert [cache.layers[i].nbytes() for i in range(LAYERS)] == expected
    assert cache.nbytes() == sum(expected) == _expected_layer_bytes(batch, plan.total, scored)
    kv = cache.kv_nbytes()
    assert kv == batch * HKV * plan.total * 2 * HEAD_DIM * 4
    # the keys/values shrink by exactly the fraction of positions kept
    assert kv * LAYERS * PROMPT == full_bytes * plan.total
    assert kv < full_bytes
    for layer in cache.layers:
        assert layer.keys.shape == (batch, HKV, layer.physical_length, HEAD_DIM)
        assert layer.values.shape == layer.keys.shape
        assert layer.token_idx.shape == (batch, HKV, layer.physical_length)
        assert layer.token_idx.dtype == torch.int32
        if scored:
            assert layer.scores.shape == layer.token_idx.shape and layer.scores.dtype == torch.float32
        else:
            assert layer.scores is None


@pytest.mark.parametrize("method", ["window", "streamingllm", "h2o"])
def test_nbytes_constant_while_decoding(method, make_model, make_ids):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, method, 10, "uniform", evict_every=1)
    model(make_ids(1, PROMPT), cache=cache)
    first = cache.nbytes()
    assert first == LAYERS * _expected_layer_bytes(1, 10, SCORED[method])
    for t in range(5):
        model(make_ids(1, 1, seed=30 + t), cache=cache)
        assert cache.nbytes() == first
        assert cache.physical_lengths() == [10] * LAYERS
        assert cache.get_seq_length() == PROMPT + t + 1


def test_nbytes_uses_the_model_dtype(make_model, make_ids):
    model = make_model("llama").to(torch.bfloat16)
    cache = squeezekv.make_cache(model, "h2o", 10, "uniform")
    model(make_ids(2, PROMPT), cache=cache)
    assert cache.layers[0].keys.dtype == torch.bfloat16
    assert cache.nbytes() == LAYERS * _expected_layer_bytes(2, 10, True, elsize=2)
    assert cache.kv_nbytes() == LAYERS * 2 * HKV * 10 * 2 * HEAD_DIM * 2


def test_nbytes_hybrid_model_counts_sliding_layers(make_model, make_ids):
    model = make_model("gemma3_text")
    window = model.config.sliding_window
    cache = squeezekv.make_cache(model, "snapkv", 12, "uniform", method_params={"window": 4})
    model(make_ids(1, PROMPT), cache=cache)
    assert cache.plan.budgets == (None, 12, None, 12)
    assert cache.physical_lengths() == [window - 1, 12, window - 1, 12]
    # transformers' sliding layer keeps a view of the last window - 1 positions, but the storage behind it is the
    # whole prompt's: nbytes counts what is allocated
    sliding = 1 * HKV * PROMPT * 2 * HEAD_DIM * 4
    assert cache.layer_nbytes() == [sliding, _expected_layer_bytes(1, 12, True)] * 2
    assert cache.kv_nbytes() == 2 * sliding + 2 * 1 * HKV * 12 * 2 * HEAD_DIM * 4


def test_given_plan_is_used(make_model, make_ids):
    model = make_model("llama")
    plan = BudgetPlan(budgets=(20, 5, 9, 14), base=12, allocation="custom")
    cache = squeezekv.make_cache(model, "streamingllm", 12, "uniform", plan=plan)
    assert cache.plan is plan
    model(make_ids(1, PROMPT), cache=cache)
    assert cache.physical_lengths() == [20, 5, 9, 14]
    for li, b in enumerate(plan.budgets):
        assert cache.layers[li].token_idx[0, 0].tolist() == [0, 1, 2, 3] + list(range(PROMPT - (b - 4), PROMPT))


# -- positions ------------------------------------------------------------------------------------------------------


def test_position_ids_after_eviction_are_true_positions(make_model, make_ids):
    model = make_model("llama")
    seen_positions = []

    def hook(module, args, kwargs):
        seen_positions.append(kwargs["position_ids"].clone())

    model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    cache = squeezekv.make_cache(model, "window", 8, "uniform")
    model(make_ids(1, PROMPT), cache=cache)
    assert cache.physical_lengths() == [8] * LAYERS
    assert cache.get_seq_length() == PROMPT
    model(make_ids(1, 1, seed=2), cache=cache)
    model(make_ids(1, 3, seed=3), cache=cache)
    model(make_ids(1, 1, seed=4), cache=cache)
    expected = [torch.arange(0, PROMPT), torch.tensor([PROMPT]), torch.arange(PROMPT + 1, PROMPT + 4),
                torch.tensor([PROMPT + 4])]
    assert len(seen_positions) == 4
    for got, exp in zip(seen_positions, expected):
        assert torch.equal(got.reshape(-1), exp)
    assert cache.get_seq_length() == PROMPT + 5
    assert all(layer.seen == PROMPT + 5 for layer in cache.layers)


@pytest.mark.parametrize("budget", [6, 11])
def test_window_logits_match_stock_model_on_kept_tokens(budget, make_model, make_ids):
    """Window policy: after eviction the model must attend to exactly the last ``budget`` tokens at their true
    (rotary) positions. Reference: the stock model with a full DynamicCache cropped by hand to the same tokens and
    explicit position ids."""
    ids = make_ids(1, PROMPT)
    stock = make_model("llama")
    dc = DynamicCache(config=stock.config)
    stock(ids, cache=dc)
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "window", budget, "uniform", evict_every=1)
    model(ids, cache=cache)
    for t in range(6):
        for layer in dc.layers:
            layer.keys = layer.keys[:, :, -budget:]
            layer.values = layer.values[:, :, -budget:]
        tok = make_ids(1, 1, seed=40 + t)
        pos = torch.tensor([[PROMPT + t]])
        ref = stock(tok, cache=dc, position_ids=pos).logits
        got = model(tok, cache=cache).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # the same reference with wrong (physical) positions would not match: the test can tell
    bad = stock(make_ids(1, 1, seed=99), cache=dc, position_ids=torch.tensor([[budget]])).logits
    good = model(make_ids(1, 1, seed=99), cache=cache).logits
    assert (bad - good).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("method", POLICIES)
def test_multi_token_chunk_after_eviction(method, backend, make_model, make_ids):
    """Feeding 3 tokens at once after eviction gives the logits of feeding them one by one (no eviction in between):
    the per-head mask over held tokens must be causal among the new tokens."""
    ids = make_ids(1, PROMPT)
    chunk = make_ids(1, 3, seed=77)
    outs = []
    for mode in ("chunk", "steps"):
        model = make_model("llama", initializer_range=0.2)
        cache = squeezekv.make_cache(model, method, 10, "uniform", method_params=_params(method), evict_every=8,
                                     attn_backend=backend)
        model(ids, cache=cache)
        assert all(layer.compressed for layer in cache.layers)
        if mode == "chunk":
            outs.append(model(chunk, cache=cache).logits)
        else:
            outs.append(torch.cat([model(chunk[:, i:i + 1], cache=cache).logits for i in range(3)], dim=1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_cache_reset_reuses_cleanly(make_model, make_ids):
    model = make_model("llama", initializer_range=0.2)
    cache = squeezekv.make_cache(model, "h2o", 10, "squeeze")
    ids = make_ids(1, PROMPT)
    first = model(ids, cache=cache).logits
    plan, kept = cache.plan, [l.token_idx.clone() for l in cache.layers]
    cache.reset()
    assert cache.plan is None and cache.importance == {} and cache.get_seq_length() == 0
    second = model(ids, cache=cache).logits
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    assert cache.plan.budgets == plan.budgets
    assert all(torch.equal(l.token_idx, k) for l, k in zip(cache.layers, kept))


def test_layers_are_squeeze_layers_and_crop_refused(make_model, make_ids):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "window", 8, "uniform")
    assert all(isinstance(l, SqueezeLayer) for l in cache.layers)
    assert cache.managed == (0, 1, 2, 3)
    model(make_ids(1, PROMPT), cache=cache)
    with pytest.raises(ValueError, match="cropped"):
        cache.layers[0].crop(2)


def test_beam_search_reorders_every_layer_tensor(make_model, make_ids):
    """Beam search (batch expansion + reorder) runs and keeps every per-token tensor aligned with the keys."""
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "h2o", 10, "uniform")
    out = model.generate(make_ids(1, PROMPT), cache=cache, max_new_tokens=5, min_new_tokens=5, num_beams=3,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (1, PROMPT + 5)
    for layer in cache.layers:
        assert layer.keys.shape[0] == 3
        assert layer.token_idx.shape == layer.keys.shape[:3] == layer.scores.shape
        assert layer.physical_length == 10


def test_describe_reports_method_allocation_and_plan(make_model, make_ids):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "snapkv", 12, "pyramid", method_params={"window": 4},
                                 allocation_params={"beta": 2.0}, evict_every=2)
    assert cache.describe()["plan"] is None
    model(make_ids(1, PROMPT), cache=cache)
    d = cache.describe()
    assert d["method"] == "snapkv" and d["method_params"] == {"window": 4, "kernel_size": 5}
    assert d["allocation"] == "pyramid" and d["allocation_params"] == {"beta": 2.0}
    assert d["budget"] == "12 tokens" and d["evict_every"] == 2
    assert d["plan"]["budgets"] == list(cache.plan.budgets) and d["plan"]["total"] == 48


def test_registry_describe_lists_every_method():
    rows = squeezekv.describe()
    from squeezekv.registry import channel_names, crosslayer_names

    assert [r["name"] for r in rows] == squeezekv.policy_names() + ALLOCATIONS + crosslayer_names() + channel_names()
    for row in rows:
        assert row["summary"] and row["paper"]
    params = {r["name"]: r["params"] for r in rows}
    assert params["snapkv"] == {"window": 64, "kernel_size": 5}
    assert params["streamingllm"] == {"sinks": 4}
    assert params["h2o"] == {"recent_ratio": 0.5}
    assert params["pyramid"] == {"beta": 20.0}
    assert params["squeeze"] == {"p": 0.38, "clusters": 3}


@pytest.mark.parametrize("method", ["window", "h2o", "snapkv"])
def test_decode_appends_in_place_into_preallocated_slots(method, make_model, make_ids):
    """Between evictions new tokens are written into pre-allocated slots (no reallocation per step); at eviction the
    old storage is released, and nbytes counts the allocated slots."""
    model = make_model("llama")
    budget, every = 10, 4
    params = {"window": 4} if method == "snapkv" else None
    cache = squeezekv.make_cache(model, method, budget, "uniform", method_params=params, evict_every=every)
    model(make_ids(1, PROMPT), cache=cache)
    layer = cache.layers[0]
    assert layer.keys.untyped_storage().nbytes() == HKV * budget * HEAD_DIM * 4  # exact right after compression
    ptrs = []
    for t in range(every + 2):
        model(make_ids(1, 1, seed=t), cache=cache)
        ptrs.append(layer.keys.untyped_storage().data_ptr())
    slots = layer.keys.untyped_storage().nbytes() // (HKV * HEAD_DIM * 4)
    if method == "snapkv":  # never evicts: grows, reserving an eighth of what it holds (11 // 8 = 1 slot, ...)
        assert layer.physical_length == budget + every + 2
        assert ptrs[0] == ptrs[1] != ptrs[2] == ptrs[3] != ptrs[4] == ptrs[5]
        assert slots == budget + every + 2  # 11 + 1, 13 + 1, 15 + 1 slots
    else:  # evicts when budget + every tokens are held
        assert ptrs[0] == ptrs[1] == ptrs[2] and ptrs[3] != ptrs[2]
        assert layer.physical_length == budget + 2 and slots == budget + every
    assert cache.nbytes() == sum(cache.layer_nbytes())


def _kv_storage_bytes(tokens_per_layer, batch=1, elsize=4):
    """The formula: tokens in each layer's storage x KV heads x head dim x dtype bytes x 2 (keys and values)."""
    return sum(batch * n * HKV * HEAD_DIM * elsize * 2 for n in tokens_per_layer)


def test_hybrid_model_full_and_compressed_bytes_are_counted_alike(make_model, make_ids):
    """Gemma 3 (sliding and full layers): transformers' sliding layer keeps a ``window - 1`` view of the prompt's
    tensor, so the full cache is counted by the storage it keeps alive, as the compressed cache is; at budget 1.0 the
    two differ by squeezekv's bookkeeping only, and a smaller budget saves memory (issue 18, item 6: -0.96)."""
    model = make_model("gemma3_text")
    window = model.config.sliding_window
    sliding = [t == "sliding_attention" for t in model.config.layer_types]
    ids = make_ids(1, PROMPT)
    full = DynamicCache(config=model.config)
    model(ids, cache=full)
    assert [l.keys.shape[-2] for l in full.layers] == [window - 1 if s else PROMPT for s in sliding]
    full_bytes = squeezekv.dynamic_cache_nbytes(full)
    assert full_bytes == _kv_storage_bytes([PROMPT] * LAYERS)  # the prompt's tensors, sliding layers included
    model(make_ids(1, 1, seed=7), cache=full)  # a decode step: the sliding layer's storage is the window's now
    assert squeezekv.dynamic_cache_nbytes(full) == _kv_storage_bytes([window if s else PROMPT + 1 for s in sliding])

    managed = sum(not s for s in sliding)
    lossless = squeezekv.make_cache(model, "snapkv", 1.0, "uniform", method_params={"window": 4})
    model(ids, cache=lossless)
    assert lossless.kv_nbytes() == full_bytes
    bookkeeping = managed * HKV * PROMPT * (4 + 4)  # int32 token index and float32 score per held token
    assert lossless.nbytes() == full_bytes + bookkeeping
    saved = 1 - lossless.nbytes() / full_bytes
    assert saved == pytest.approx(-bookkeeping / full_bytes)

    small = squeezekv.make_cache(model, "snapkv", 12, "uniform", method_params={"window": 4})
    model(ids, cache=small)
    assert small.nbytes() == 2 * _kv_storage_bytes([PROMPT]) + managed * _expected_layer_bytes(1, 12, True)
    assert small.nbytes() < full_bytes  # fewer tokens held: memory is saved, never a negative saving


def test_allocated_nbytes_counts_each_storage_once():
    buf = torch.zeros(2, 3, 10, 4)
    assert squeezekv.allocated_nbytes([buf[:, :, :3], buf[:, :, 5:], None, buf]) == buf.numel() * 4
    seen: set = set()
    assert squeezekv.allocated_nbytes([buf], seen) == buf.numel() * 4
    assert squeezekv.allocated_nbytes([buf[:, :1]], seen) == 0  # counted already
    assert squeezekv.allocated_nbytes([torch.empty(2, 3, 0, 4)]) == 0
