"""The budget rules a newcomer relies on (issue 18, items 2-5):

* a budget below a policy's window/sink count shrinks them to fit (recorded in ``cache.plan.details``), a budget that
  covers the prompt keeps every token, and no shipped policy raises half-way through ``generate``;
* ``budget=1.0`` keeps every token, prompt and decoded: the full cache's greedy tokens and logits;
* storage never holds room for many more tokens than exist, however large the budget (KIVI's residual too);
* sliding-window layers hold at most the ``window - 1`` tokens a later query can see.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import squeezekv
from squeezekv.plan import BudgetPlan

HKV, HEAD_DIM, LAYERS = 2, 16, 4  # the tiny models of conftest.py (float32)
NEW = 4


def _prefill_and_decode(model, ids, cache, steps: int) -> list[torch.Tensor]:
    """Prefill ``ids`` into ``cache``, then ``steps`` greedy single-token steps; the logits of every step."""
    out = model(ids, cache=cache)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        tok = logits[-1].argmax(-1, keepdim=True)
        logits.append(model(tok, cache=cache).logits[:, -1])
    return logits


# -- item 2: policies fit small budgets ------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [10, 63, 100, 300])
def test_defaults_work_on_ordinary_prompts(prompt, make_model, make_ids, run_greedy):
    model = make_model("llama", max_position_embeddings=512)
    cache = squeezekv.make_cache(model)  # the defaults: snapkv (window 64), half of the prompt, squeeze allocation
    assert cache.spec == squeezekv.CacheSpec() == squeezekv.CacheSpec(method="snapkv", budget=0.5, allocation="squeeze")
    out = run_greedy(model, make_ids(1, prompt), cache=cache, new_tokens=NEW)
    assert out.sequences.shape[1] == prompt + NEW
    base = max(1, round(0.5 * prompt))
    budgets = cache.plan.budgets
    assert cache.plan.base == base and sum(budgets) == base * LAYERS and max(budgets) <= prompt
    # the observation window shrank to half of each evicting layer's budget, recorded once per setting
    expected: dict[str, list[int]] = {}
    for i, b in enumerate(budgets):
        if b < prompt and b // 2 < 64:  # an evicting layer whose budget is below twice the window
            expected.setdefault(f"window 64 -> {max(1, b // 2)}", []).append(i)
    assert cache.plan.details.get("policy_fitted", {}) == expected
    for layer, b in zip(cache.layers, budgets):  # snapkv compresses the prompt to the budget, then appends
        assert layer.physical_length == b + NEW - 1


def test_snapkv_63_token_prompt_at_budget_1_keeps_everything(make_model, make_ids, run_greedy, same_generation):
    model = make_model("llama")
    ids = make_ids(1, 63)
    ref = run_greedy(model, ids, new_tokens=NEW)
    cache = squeezekv.make_cache(model, "snapkv", 1.0)
    same_generation(ref, run_greedy(model, ids, cache=cache, new_tokens=NEW))
    assert cache.plan.budgets == (63,) * LAYERS and "policy_fitted" not in cache.plan.details
    assert cache.physical_lengths() == [63 + NEW - 1] * LAYERS


@pytest.mark.parametrize("method", ["streamingllm", "h2o"])
def test_one_token_prompt(method, make_model, make_ids, run_greedy):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, method, 0.2)  # 1 token per layer
    out = run_greedy(model, make_ids(1, 1), cache=cache, new_tokens=NEW)
    assert out.sequences.shape[1] == 1 + NEW
    assert cache.plan.budgets == (1,) * LAYERS
    assert cache.physical_lengths() == [1] * LAYERS  # evicted down to the budget after every decoding step
    if method == "streamingllm":  # no room for a sink besides the newest token
        assert cache.plan.details["policy_fitted"] == {"sinks 4 -> 0": list(range(LAYERS))}
        for layer in cache.layers:
            assert layer.token_idx.flatten().tolist() == [NEW - 1] * HKV
    else:  # h2o's recent part rounds to 0 at budget 1: nothing to fit
        assert "policy_fitted" not in cache.plan.details


def test_streamingllm_sinks_shrink_to_fit(make_model, make_ids):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "streamingllm", 3, allocation="uniform")
    _prefill_and_decode(model, make_ids(1, 20), cache, steps=2)
    assert cache.plan.details["policy_fitted"] == {"sinks 4 -> 2": list(range(LAYERS))}
    for layer in cache.layers:  # 2 sinks + the newest token
        assert layer.token_idx[0, 0].tolist() == [0, 1, 21]


@pytest.mark.parametrize("allocation", ["pyramid", "squeeze"])
@pytest.mark.parametrize("prompt", [12, 40])
def test_snapkv_with_non_uniform_allocations_on_short_prompts(allocation, prompt, make_model, make_ids, run_greedy):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "snapkv", 0.3, allocation)
    ids = make_ids(1, prompt)
    model(ids, cache=cache)
    plan = cache.plan
    assert plan.total == LAYERS * max(1, round(0.3 * prompt))
    for i, layer in enumerate(cache.layers):  # eviction happened: the kept count is the plan's budget
        assert layer.physical_length == min(plan[i], prompt)
    fitted = plan.details["policy_fitted"]
    assert sorted(i for layers in fitted.values() for i in layers) == list(range(LAYERS))
    for key, layers in fitted.items():
        assert all(key == f"window 64 -> {max(1, plan[i] // 2)}" for i in layers)
    cache = squeezekv.make_cache(model, "snapkv", 0.3, allocation)
    out = run_greedy(model, ids, cache=cache, new_tokens=NEW)
    assert out.sequences.shape[1] == prompt + NEW


def test_given_plan_below_the_window_is_fitted_at_make_cache(make_model, make_ids):
    model = make_model("llama")
    plan = BudgetPlan(budgets=(16, 16, 7, 16), base=16, allocation="custom")
    cache = squeezekv.make_cache(model, "snapkv", 16, plan=plan, method_params={"window": 8})
    assert cache.plan.details["policy_fitted"] == {"window 8 -> 3": [2]}
    model(make_ids(1, 24), cache=cache)
    assert cache.physical_lengths() == [16, 16, 7, 16]
    for layer in cache.layers:  # the kept window is the newest tokens: 8 on full layers, 3 on layer 2
        w = 3 if layer.layer_idx == 2 else 8
        assert (layer.token_idx[..., -w:] == torch.arange(24 - w, 24, dtype=torch.int32)).all()


# -- item 3: budget 1.0 keeps everything -----------------------------------------------------------------------------


@pytest.mark.parametrize("allocation", ["uniform", "pyramid", "squeeze"])
@pytest.mark.parametrize("method", squeezekv.policy_names())
def test_budget_one_equals_the_full_cache(method, allocation, make_model, make_ids, run_greedy, same_generation):
    model = make_model("llama")
    ids = make_ids(1, 12)
    new = 6
    ref = run_greedy(model, ids, new_tokens=new)  # stock model, DynamicCache
    cache = squeezekv.make_cache(model, method, 1.0, allocation)  # the policy's own parameters (snapkv window 64)
    same_generation(ref, run_greedy(model, ids, cache=cache, new_tokens=new))
    for layer in cache.layers:  # nothing evicted, prompt or decoded
        assert layer.token_idx[0, 0].tolist() == list(range(12 + new - 1))
    if squeezekv.POLICIES[method].evicts:
        assert cache.plan.details["decoding"] == "no eviction (budget 1.0 keeps every token)"


def test_budget_one_left_padded_batch(make_model, make_left_padded, run_greedy, same_generation):
    model = make_model("llama")
    ids, mask = make_left_padded([12, 7, 3], 12)
    ref = run_greedy(model, ids, mask, new_tokens=NEW)
    cache = squeezekv.make_cache(model, "streamingllm", 1.0)
    same_generation(ref, run_greedy(model, ids, mask, cache=cache, new_tokens=NEW))
    assert cache.physical_lengths() == [12 + NEW - 1] * LAYERS


# -- item 4: storage bounded by the tokens that exist ----------------------------------------------------------------


def _slots_after(prompt: int, steps: int, *, slack: int, context: int = 256) -> int:
    """Slots a layer growing below its budget holds after ``steps`` decoding steps: ``cache.SqueezeLayer._cap_reserve``
    reserves max(slack, min(63, held // 8)) free slots when the buffer is full (``slack`` = evict_every for a layer
    that evicts while decoding, 0 for one that only grows), never past the context."""
    n = slots = prompt
    for _ in range(steps):
        n += 1
        if n > slots:
            slots = n + min(max(slack, min(63, n // 8)), context - n)
    return slots


def _per_token_bytes(scores: bool) -> int:
    """Bytes one held token costs per KV head in a plain layer: float32 key and value, int32 index, float32 score."""
    return 2 * HEAD_DIM * 4 + 4 + (4 if scores else 0)


@pytest.mark.parametrize("budget", [4096, 100000])
@pytest.mark.parametrize("method", ["window", "streamingllm", "h2o", "snapkv"])
def test_large_budget_holds_about_the_full_cache(method, budget, make_model, make_ids):
    model = make_model("llama")
    prompt, steps = 20, 10
    ids = make_ids(1, prompt)
    cache = squeezekv.make_cache(model, method, budget)
    model(ids, cache=cache)
    ref = model(ids, use_cache=True).past_key_values  # the full DynamicCache
    full = squeezekv.dynamic_cache_nbytes(ref)
    scores = squeezekv.POLICIES[method].uses_scores
    bookkeeping = LAYERS * HKV * prompt * (4 + (4 if scores else 0))
    assert cache.kv_nbytes() == full  # after the prefill: exactly the full cache's keys and values
    assert cache.nbytes() == full + bookkeeping
    for t in range(steps):
        model(make_ids(1, 1, seed=t), cache=cache)
    held = prompt + steps
    slack = 0 if method == "snapkv" else 1  # snapkv never evicts while decoding; the others every step
    slots = _slots_after(prompt, steps, slack=slack)
    assert cache.physical_lengths() == [held] * LAYERS
    assert cache.nbytes() == LAYERS * HKV * slots * _per_token_bytes(scores)
    assert slots <= held + max(1, held // 8)  # 30 tokens: 33 slots (was 4097 / 100001 before the fix)
    # a budget above the model's context is capped at it, and the plan says so
    assert cache.plan.budgets == (256,) * LAYERS and cache.plan.details["capped_at_context"] == 256


def test_kivi_residual_holds_about_the_tokens_that_exist(make_model, make_ids):
    model = make_model("llama")
    prompt, steps = 20, 10
    cache = squeezekv.make_cache(model, "none", channel="kivi", channel_params={"group_size": 8, "residual": 128})
    model(make_ids(1, prompt), cache=cache)
    for t in range(steps):
        model(make_ids(1, 1, seed=t), cache=cache)
    # nothing quantised yet (30 < 128 residual tokens): the full-precision residual and its token indices only
    slots = _slots_after(prompt, steps, slack=0)
    assert [layer.residual_length for layer in cache.layers] == [prompt + steps] * LAYERS
    assert cache.nbytes() == LAYERS * HKV * slots * _per_token_bytes(scores=False)  # was 158 slots per layer


# -- item 5: sliding-window layers -----------------------------------------------------------------------------------

SLIDING = {"mistral": {}, "phi3": {"sliding_window": 8},
           "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}}


@pytest.mark.parametrize("method", ["window", "streamingllm", "h2o", "snapkv"])
@pytest.mark.parametrize("arch", list(SLIDING))
def test_sliding_layers_hold_no_more_than_transformers_cache(arch, method, make_model, make_ids):
    model = make_model(arch, **SLIDING[arch])
    window = model.config.sliding_window
    ids = make_ids(1, 24)
    ref = DynamicCache(config=model.config)
    cache = squeezekv.make_cache(model, method, 100, method_params={"window": 8} if method == "snapkv" else None)
    ref_logits = _prefill_and_decode(model, ids, ref, steps=NEW)
    logits = _prefill_and_decode(model, ids, cache, steps=NEW)
    # the tokens transformers' own sliding cache lets a query see (window - 1 per layer), plus squeezekv's bookkeeping;
    # never more than what transformers' cache allocates (both counted as allocated storage)
    kv = LAYERS * HKV * (window - 1) * 2 * HEAD_DIM * 4
    assert cache.kv_nbytes() == kv <= squeezekv.dynamic_cache_nbytes(ref)
    scores = squeezekv.POLICIES[method].uses_scores
    assert cache.nbytes() == kv + LAYERS * HKV * (window - 1) * (4 + 4 * scores)
    # everything a query can see is kept: the full cache's logits
    torch.testing.assert_close(torch.stack(logits), torch.stack(ref_logits), atol=1e-5, rtol=0)
    assert cache.plan.budgets == (window - 1,) * LAYERS
    assert cache.plan.details["capped_at_sliding_window"] == {"tokens": window - 1, "layers": list(range(LAYERS))}
    assert all(cache.layers[i].sliding_window == window for i in cache.managed)


@pytest.mark.parametrize("method", ["h2o", "snapkv"])
def test_budget_of_the_window_equals_the_full_cache(method, make_model, make_ids, run_greedy, same_generation):
    model = make_model("mistral")  # window 8
    ids = make_ids(1, 24)
    ref = run_greedy(model, ids, new_tokens=NEW)
    cache = squeezekv.make_cache(model, method, 8, "uniform",
                                 method_params={"window": 4} if method == "snapkv" else None)
    same_generation(ref, run_greedy(model, ids, cache=cache, new_tokens=NEW))


def test_h2o_keeps_no_token_outside_the_window(make_model, make_ids):
    model = make_model("mistral")  # window 8
    window = model.config.sliding_window
    cache = squeezekv.make_cache(model, "h2o", 5, allocation="uniform")
    model(make_ids(1, 24), cache=cache)
    for t in range(6):
        for layer in cache.layers:
            assert layer.physical_length == 5
            assert (layer.token_idx > layer.seen - window).all(), (layer.seen, layer.token_idx)
        model(make_ids(1, 1, seed=t), cache=cache)
