"""Which tokens each eviction policy keeps, checked against independent references.

H2O and SnapKV are recomputed from a stock eager model's ``output_attentions``; StreamingLLM and window have closed-form
kept sets. Checks are per layer and per KV head, after the prefill and after decoding steps, with and without left
padding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import squeezekv

POLICIES = [p for p in squeezekv.policy_names() if p != "none"]  # the ones that evict (none: tests/test_equivalence.py)
ALLOCATIONS = squeezekv.allocation_names()
#: allocation parameters that leave every layer of a short prompt a usable budget (>= sinks + 1)
ALLOC_PARAMS = {"pyramid": {"beta": 2.0}, "squeeze": {"p": 0.5}}

PROMPT = 24
HKV = 2
GROUP = 2


#: larger initial weights than the default 0.02 make the attention peaky, so heads and layers disagree on which
#: tokens matter (with near-uniform attention H2O would keep the first tokens everywhere)
PEAKY = {"initializer_range": 0.2}


def _stock_attentions(make_model, ids, mask=None):
    """Per-layer softmax attention ``[B, Hq, q, n]`` of the stock eager model (same weights as make_model's)."""
    ref = make_model("llama", attn="eager", **PEAKY)
    out = ref(ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == ref.config.num_hidden_layers
    return [a.float() for a in out.attentions]


def _pads(mask, b):
    return 0 if mask is None else int((mask[b] == 0).sum())


def _topk_set(values: torch.Tensor, k: int, allowed: torch.Tensor) -> tuple[set[int], float]:
    """Indices of the k largest ``values`` among ``allowed`` positions, and the gap between the k-th and (k+1)-th
    (so a test can insist the reference is not decided by a rounding-level tie)."""
    v = values.masked_fill(~allowed, float("-inf"))
    order = v.argsort(descending=True)
    chosen = {int(i) for i in order[:k]}
    nxt = v[order[k]] if k < int(allowed.sum()) else torch.tensor(float("-inf"))
    gap = float(v[order[k - 1]] - nxt) if k > 0 else float("inf")
    return chosen, gap


def _kept(layer, b, h) -> list[int]:
    idx = layer.token_idx[b, h].tolist()
    assert idx == sorted(idx), "token_idx must be ascending (temporal order)"
    assert len(set(idx)) == len(idx)
    return idx


# -- H2O ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [[PROMPT], [PROMPT, 19, 14]], ids=["batch1", "leftpad3"])
@pytest.mark.parametrize("budget", [10, 7])
def test_h2o_prefill_keeps_reference_heavy_hitters(lengths, budget, make_model, make_left_padded):
    ids, mask = make_left_padded(lengths, PROMPT, seed=3)
    if len(lengths) == 1:
        mask = None
    atts = _stock_attentions(make_model, ids, mask)
    model = make_model("llama", **PEAKY)
    cache = squeezekv.make_cache(model, "h2o", budget, "uniform")
    model(ids, attention_mask=mask, cache=cache)
    recent = int(round(0.5 * budget))
    min_gap = float("inf")
    for li, att in enumerate(atts):
        bsz, hq, q, n = att.shape
        qmask = torch.ones(bsz, q) if mask is None else mask.float()
        # scores: attention received, summed over the (real) queries and over the query heads of each KV group
        scores = (att * qmask[:, None, :, None]).sum(dim=2).reshape(bsz, HKV, GROUP, n).sum(dim=2)  # [B, Hkv, n]
        layer = cache.layers[li]
        assert layer.physical_length == budget
        assert layer.seen == PROMPT
        for b in range(bsz):
            p = _pads(mask, b)
            real = torch.arange(n) >= p
            for h in range(HKV):
                recent_set = set(range(n - recent, n))
                older = real & (torch.arange(n) < n - recent)
                heavy, gap = _topk_set(scores[b, h], budget - recent, older)
                min_gap = min(min_gap, gap)
                assert _kept(layer, b, h) == sorted(recent_set | heavy), (li, b, h)
                # the layer's stored scores are those accumulated scores, for the tokens it kept
                kept = layer.token_idx[b, h].long()
                torch.testing.assert_close(layer.scores[b, h], scores[b, h, kept], atol=1e-5, rtol=1e-5)
    assert min_gap > 1e-4, "reference decided by a near tie: pick another seed"


@pytest.mark.parametrize("lengths", [[PROMPT], [PROMPT, 17]], ids=["batch1", "leftpad2"])
def test_h2o_scores_accumulate_every_query(lengths, make_model, make_left_padded, make_ids):
    """Without eviction, each KV head's scores sum to (real queries so far) * (query heads per group): each query
    head's weights sum to one, and padding queries contribute nothing."""
    ids, mask = make_left_padded(lengths, PROMPT, seed=5)
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "h2o", 1000, "uniform")
    model(ids, attention_mask=mask, cache=cache)
    steps = 5
    for t in range(steps):
        mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=mask.dtype)], dim=1)
        model(make_ids(len(lengths), 1, seed=50 + t), attention_mask=mask, cache=cache)
    for layer in cache.layers:
        assert layer.scores.dtype == torch.float32
        expected = torch.tensor([float((n + steps) * GROUP) for n in lengths])[:, None].expand(-1, HKV)
        torch.testing.assert_close(layer.scores.sum(-1), expected, atol=1e-4, rtol=0)
        # padding positions never receive attention from a real query
        for b, n in enumerate(lengths):
            assert float(layer.scores[b, :, : PROMPT - n].abs().sum()) == 0.0


def test_h2o_decoding_keeps_budget_and_recent_window(make_model, make_ids):
    model = make_model("llama")
    budget = 10
    cache = squeezekv.make_cache(model, "h2o", budget, "uniform", evict_every=1)
    model(make_ids(1, PROMPT), cache=cache)
    for t in range(6):
        model(make_ids(1, 1, seed=60 + t), cache=cache)
        seen = PROMPT + t + 1
        for layer in cache.layers:
            assert layer.seen == seen
            assert layer.physical_length == budget
            for h in range(HKV):
                kept = _kept(layer, 0, h)
                assert kept[-5:] == list(range(seen - 5, seen))  # the recent half is always kept


# -- SnapKV ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [[PROMPT], [PROMPT, 18, 13]], ids=["batch1", "leftpad3"])
@pytest.mark.parametrize("window,budget", [(4, 10), (8, 11)])
def test_snapkv_prefill_keeps_reference_votes(lengths, window, budget, make_model, make_left_padded):
    ids, mask = make_left_padded(lengths, PROMPT, seed=7)
    if len(lengths) == 1:
        mask = None
    atts = _stock_attentions(make_model, ids, mask)
    model = make_model("llama", **PEAKY)
    cache = squeezekv.make_cache(model, "snapkv", budget, "uniform", method_params={"window": window})
    model(ids, attention_mask=mask, cache=cache)
    min_gap = float("inf")
    for li, att in enumerate(atts):
        bsz, hq, q, n = att.shape
        votes = att[:, :, -window:, :].sum(dim=2).reshape(bsz, HKV, GROUP, n).mean(dim=2)  # [B, Hkv, n]
        prefix = n - window
        pooled = F.avg_pool1d(votes[..., :prefix].reshape(bsz * HKV, 1, prefix), 5, stride=1, padding=2)
        pooled = pooled.reshape(bsz, HKV, prefix)
        layer = cache.layers[li]
        assert layer.physical_length == budget
        for b in range(bsz):
            p = _pads(mask, b)
            real_prefix = torch.arange(prefix) >= p
            for h in range(HKV):
                chosen, gap = _topk_set(pooled[b, h], budget - window, real_prefix)
                min_gap = min(min_gap, gap)
                assert _kept(layer, b, h) == sorted(chosen | set(range(prefix, n))), (li, b, h)
    assert min_gap > 1e-5, "reference decided by a near tie: pick another seed"


def test_snapkv_compresses_once_then_appends(make_model, make_ids):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "snapkv", 10, "uniform", method_params={"window": 4})
    model(make_ids(1, PROMPT), cache=cache)
    after_prefill = [layer.token_idx.clone() for layer in cache.layers]
    for t in range(5):
        model(make_ids(1, 1, seed=70 + t), cache=cache)
        for layer, first in zip(cache.layers, after_prefill):
            assert layer.physical_length == 10 + t + 1
            new = torch.arange(PROMPT, PROMPT + t + 1, dtype=torch.int32).expand(1, HKV, -1)
            assert torch.equal(layer.token_idx, torch.cat([first, new], dim=-1))


# -- padding never kept ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", POLICIES)
def test_no_padding_kept_with_enough_real_tokens(method, make_model, make_left_padded, make_ids):
    lengths = [PROMPT, 16, 12]
    budget = 10
    ids, mask = make_left_padded(lengths, PROMPT, seed=9)
    model = make_model("llama")
    params = {"window": 4} if method == "snapkv" else {}
    cache = squeezekv.make_cache(model, method, budget, "uniform", method_params=params)
    model(ids, attention_mask=mask, cache=cache)
    for step in range(4):
        for li, layer in enumerate(cache.layers):
            for b, n in enumerate(lengths):
                pads = PROMPT - n
                assert int(layer.token_idx[b].min()) >= pads, (method, step, li, b)
            if layer.valid is not None:
                assert bool(layer.valid.all())
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        model(make_ids(3, 1, seed=80 + step), attention_mask=mask, cache=cache)


# -- StreamingLLM and window: closed-form kept sets --------------------------------------------------------------


def _expected(method, budget, pads, seen, sinks=4):
    if method == "window":
        return list(range(seen - budget, seen))
    return list(range(pads, pads + sinks)) + list(range(seen - (budget - sinks), seen))


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("method", ["streamingllm", "window"])
@pytest.mark.parametrize("lengths", [[PROMPT], [PROMPT, 20, 18]], ids=["batch1", "leftpad3"])
def test_streaming_and_window_keep_exact_tokens(method, allocation, lengths, make_model, make_left_padded, make_ids):
    ids, mask = make_left_padded(lengths, PROMPT, seed=11)
    bsz = len(lengths)
    model = make_model("llama")
    cache = squeezekv.make_cache(model, method, 12, allocation, allocation_params=ALLOC_PARAMS.get(allocation),
                                 evict_every=1)
    model(ids, attention_mask=mask, cache=cache)
    budgets = cache.plan.budgets
    assert len(budgets) == 4 and sum(budgets) == 4 * 12
    checked = 0
    for step in range(6):
        seen = PROMPT + step
        for li, layer in enumerate(cache.layers):
            assert layer.seen == seen
            assert layer.get_seq_length() == seen
            assert layer.physical_length == min(budgets[li], seen)
            for b in range(bsz):
                if budgets[li] >= seen:
                    exp = list(range(seen))  # nothing to evict
                elif lengths[b] + step >= budgets[li]:
                    exp = _expected(method, budgets[li], PROMPT - lengths[b], seen)
                    checked += 1
                else:
                    continue  # fewer real tokens than the budget: which padding fills the rest is unspecified
                for h in range(HKV):
                    assert _kept(layer, b, h) == exp, (method, allocation, step, li, b, h)
        assert cache.get_seq_length() == seen
        mask = torch.cat([mask, torch.ones(bsz, 1, dtype=mask.dtype)], dim=1)
        model(make_ids(bsz, 1, seed=90 + step), attention_mask=mask, cache=cache)
    assert checked >= 6 * bsz


@pytest.mark.parametrize("sinks", [0, 2, 6])
def test_streamingllm_sinks_parameter(sinks, make_model, make_left_padded, make_ids):
    ids, mask = make_left_padded([PROMPT, 14], PROMPT, seed=12)
    model = make_model("llama", layers=2)
    cache = squeezekv.make_cache(model, "streamingllm", 10, "uniform", method_params={"sinks": sinks})
    model(ids, attention_mask=mask, cache=cache)
    for _ in range(3):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        model(make_ids(2, 1, seed=13), attention_mask=mask, cache=cache)
    for layer in cache.layers:
        for b, n in enumerate([PROMPT, 14]):
            assert _kept(layer, b, 0) == _expected("streamingllm", 10, PROMPT - n, PROMPT + 3, sinks=sinks)


def test_generate_seen_equals_prompt_plus_generated(make_model, make_ids, run_greedy):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "streamingllm", 12, "uniform")
    out = run_greedy(model, make_ids(1, PROMPT), cache=cache, new_tokens=9)
    total = out.sequences.shape[1]
    assert total == PROMPT + 9
    # generate feeds every token but the last generated one
    for layer in cache.layers:
        assert layer.seen == total - 1
        assert _kept(layer, 0, 0) == _expected("streamingllm", 12, 0, total - 1)


@pytest.mark.parametrize("evict_every", [1, 3])
def test_window_evict_every(evict_every, make_model, make_ids):
    model = make_model("llama", layers=2)
    budget = 8
    cache = squeezekv.make_cache(model, "window", budget, "uniform", evict_every=evict_every)
    model(make_ids(1, PROMPT), cache=cache)
    lengths = []
    for t in range(7):
        model(make_ids(1, 1, seed=20 + t), cache=cache)
        layer = cache.layers[0]
        lengths.append(layer.physical_length)
        seen = PROMPT + t + 1
        assert _kept(layer, 0, 0) == list(range(seen - layer.physical_length, seen))
    if evict_every == 1:
        assert lengths == [budget] * 7
    else:  # evicts whenever budget + evict_every tokens are held
        assert lengths == [budget + 1, budget + 2, budget, budget + 1, budget + 2, budget, budget + 1]


def test_heads_can_keep_different_tokens(make_model, make_ids):
    """H2O and SnapKV choose per KV head: on a random model at least one layer's heads disagree."""
    for method, params in (("h2o", {}), ("snapkv", {"window": 4})):
        model = make_model("llama", **PEAKY)
        cache = squeezekv.make_cache(model, method, 10, "uniform", method_params=params)
        model(make_ids(1, PROMPT, seed=4), cache=cache)
        assert any(not torch.equal(l.token_idx[0, 0], l.token_idx[0, 1]) for l in cache.layers), method


@pytest.mark.parametrize("allocation", ["uniform", "pyramid"])
@pytest.mark.parametrize("method", POLICIES)
def test_left_padded_rows_match_rows_alone(method, allocation, make_model, make_left_padded, run_greedy):
    """With eviction, each row of a left-padded batch generates what that row generates alone (padding is invisible
    to scoring, sinks, windows and positions)."""
    lengths = [PROMPT, 18, 13]
    params = {"window": 4} if method == "snapkv" else {}
    alloc_params = ALLOC_PARAMS.get(allocation)
    ids, mask = make_left_padded(lengths, PROMPT, seed=5)
    model = make_model("llama", **PEAKY)
    cache = squeezekv.make_cache(model, method, 10, allocation, method_params=params, allocation_params=alloc_params)
    batch = run_greedy(model, ids, mask, cache=cache, new_tokens=10)
    assert all(layer.compressed for layer in cache.layers)  # tokens were evicted in every layer
    for b, n in enumerate(lengths):
        alone_model = make_model("llama", **PEAKY)
        alone_cache = squeezekv.make_cache(alone_model, method, 10, allocation, method_params=params,
                                           allocation_params=alloc_params)
        alone = run_greedy(alone_model, ids[b:b + 1, PROMPT - n:], cache=alone_cache, new_tokens=10)
        assert torch.equal(batch.sequences[b, PROMPT - n:], alone.sequences[0])
        for step, (x, y) in enumerate(zip(batch.logits, alone.logits)):
            torch.testing.assert_close(x[b], y[0], atol=5e-5, rtol=0, msg=lambda m: f"row {b} step {step}: {m}")


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gemma3_text", "phi3"])
def test_left_padded_rows_match_rows_alone_other_architectures(arch, make_model, make_left_padded, run_greedy):
    """H2O + squeeze on every architecture: the batch's plan (measured on the whole batch) replayed on each row alone
    gives that row's tokens and logits."""
    lengths = [PROMPT, 18, 13]
    ids, mask = make_left_padded(lengths, PROMPT, seed=5)
    model = make_model(arch, **PEAKY)
    cache = squeezekv.make_cache(model, "h2o", 10, "squeeze")
    batch = run_greedy(model, ids, mask, cache=cache, new_tokens=10)
    assert all(cache.layers[i].compressed for i in cache.managed)
    for b, n in enumerate(lengths):
        alone_model = make_model(arch, **PEAKY)
        alone_cache = squeezekv.make_cache(alone_model, "h2o", 10, "squeeze", plan=cache.plan)
        alone = run_greedy(alone_model, ids[b:b + 1, PROMPT - n:], cache=alone_cache, new_tokens=10)
        assert torch.equal(batch.sequences[b, PROMPT - n:], alone.sequences[0])
        for step, (x, y) in enumerate(zip(batch.logits, alone.logits)):
            torch.testing.assert_close(x[b], y[0], atol=5e-5, rtol=0, msg=lambda m: f"row {b} step {step}: {m}")
