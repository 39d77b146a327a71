"""Shared Attention (squeezekv.crosslayer.shared_attention): exactness against a hand-written reference, no keys in
shared layers, byte formula, and eviction that keeps a span's layers on exactly the same tokens."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

import squeezekv
import squeezekv.attention_math
from squeezekv.crosslayer import shared_attention as sa
from squeezekv.crosslayer.shared_attention import SharedAttention, SharedLayer, SourceLayer, load_spans
from squeezekv.plan import BudgetPlan

PROMPT = 24
NEW = 12
BIG = 4096


def _cache(model, spans, method="h2o", budget=BIG, allocation="uniform", **kw):
    params = {"window": 4} if method == "snapkv" else {}
    return squeezekv.make_cache(model, method, budget, allocation, method_params=params,
                                crosslayer="shared_attention", crosslayer_params={"spans": spans}, **kw)


# -- exactness --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True])
def test_spans_of_one_layer_equal_the_full_cache(padded, make_model, make_ids, make_left_padded, run_greedy,
                                                 same_generation):
    model = make_model("llama")
    if padded:
        ids, mask = make_left_padded([PROMPT, 17, 9], PROMPT)
    else:
        ids, mask = make_ids(1, PROMPT), None
    ref = run_greedy(model, ids, mask, new_tokens=NEW)
    cache = _cache(model, [[0, 0], [2, 2]])
    out = run_greedy(model, ids, mask, cache=cache, new_tokens=NEW)
    same_generation(ref, out)
    assert not any(isinstance(layer, (SourceLayer, SharedLayer)) for layer in cache.layers)


def _reference_attention(source: int, shared: set[int], store: dict):
    """An independent Shared Attention: layer ``source`` computes softmax(QK^T) by hand (causal, no padding) and
    stores it; layers in ``shared`` return stored weights @ their own values (GQA: repeat the KV heads)."""

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [1, Hq, q, D], key/value [1, Hkv, n, D] (the full DynamicCache)
        hq, q_len, n = query.shape[1], query.shape[2], key.shape[2]
        rep = hq // key.shape[1]
        value = value.repeat_interleave(rep, dim=1)
        i = module.layer_idx
        if i in shared:
            weights = store["w"]
        else:
            k = key.repeat_interleave(rep, dim=1)
            logits = (query.double() @ k.double().transpose(-1, -2)) * scaling
            q_pos = torch.arange(n - q_len, n)[:, None]
            logits = logits.masked_fill(torch.arange(n)[None, :] > q_pos, float("-inf"))
            weights = logits.softmax(-1)
            if i == source:
                store["w"] = weights
        out = (weights @ value.double()).to(query.dtype)  # [1, Hq, q, D]
        return out.transpose(1, 2).contiguous(), None

    return attn


@pytest.mark.parametrize("spans,source,shared", [([[1, 3]], 1, {2, 3}), ([[0, 2]], 0, {1, 2})])
def test_forced_sharing_equals_hand_computed_reference(spans, source, shared, make_model, make_ids, run_greedy,
                                                       same_generation):
    model = make_model("llama")
    ids = make_ids(1, PROMPT)
    name = f"test_shared_reference_{source}"
    AttentionInterface.register(name, _reference_attention(source, shared, {}))
    model.set_attn_implementation(name)
    ref = run_greedy(model, ids, cache=DynamicCache(config=model.config), new_tokens=NEW)
    model.set_attn_implementation("sdpa")
    plain = run_greedy(model, ids, new_tokens=NEW)
    # sharing really changes the model's output (else the test could not fail)
    assert (ref.logits[0] - plain.logits[0]).abs().max() > 1e-3
    cache = _cache(model, spans)
    out = run_greedy(model, ids, cache=cache, new_tokens=NEW)
    same_generation(ref, out, atol=1e-5)
    squeezekv.detach(model)


def test_long_prompt_recomputes_weights_in_chunks(monkeypatch, make_model, make_ids, run_greedy, same_generation):
    # tiny block: the prompt's weights do not fit one chunk, so the span's layers recompute them chunk by chunk
    model = make_model("llama")
    ids = make_ids(1, PROMPT)
    ref = run_greedy(model, ids, cache=_cache(model, [[1, 3]]), new_tokens=4)
    monkeypatch.setattr(sa, "EAGER_BLOCK", 4 * 2 * PROMPT)
    monkeypatch.setattr(squeezekv.attention_math, "EAGER_BLOCK", 4 * 2 * PROMPT)
    cache = _cache(model, [[1, 3]])
    out = run_greedy(model, ids, cache=cache, new_tokens=4)
    same_generation(ref, out, atol=1e-5)


# -- memory -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True])
def test_shared_layers_hold_no_keys_and_bytes_follow_the_formula(padded, make_model, make_ids, make_left_padded):
    model = make_model("llama", layers=4)
    cfg = model.config
    b, hkv, d = 2, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    if padded:
        ids, mask = make_left_padded([PROMPT, 15], PROMPT)
    else:
        ids, mask = make_ids(b, PROMPT), None
    cache = _cache(model, [[1, 3]], method="snapkv", budget=16)
    model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    pad_bytes = b * hkv * 16 if padded else 0  # one bool per held token when the batch has padding
    for i in (2, 3):
        layer = cache.layers[i]
        assert isinstance(layer, SharedLayer)
        assert layer.keys.numel() == 0 and layer.keys.untyped_storage().nbytes() == 0
        assert layer.physical_length == 16 and cache.physical_lengths()[i] == 16
        # values float32 + token_idx int32 (+ padding flags): no keys, no scores
        assert layer.nbytes() == b * hkv * 16 * (d * 4 + 4) + pad_bytes
        assert layer.kv_nbytes() == b * hkv * 16 * d * 4
    src = cache.layers[1]
    # keys + values + token_idx + SnapKV scores
    assert src.nbytes() == b * hkv * 16 * (2 * d * 4 + 4 + 4) + pad_bytes
    assert cache.kv_nbytes() == 2 * b * hkv * 16 * d * 4 * 2 + 2 * b * hkv * 16 * d * 4


# -- eviction ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocation", ["uniform", "pyramid", "squeeze"])
@pytest.mark.parametrize("method", ["h2o", "snapkv", "streamingllm"])
def test_eviction_keeps_the_sources_tokens(method, allocation, make_model, make_left_padded, run_greedy):
    model = make_model("llama", layers=6)
    ids, mask = make_left_padded([40, 31], 40)
    cache = _cache(model, [[1, 3], [4, 5]], method=method, budget=20, allocation=allocation)
    run_greedy(model, ids, mask, cache=cache, new_tokens=NEW)
    plan = cache.plan
    assert plan.details["tied_layers"] == [[1, 2, 3], [4, 5]]
    for src, span in ((1, (2, 3)), (4, (5,))):
        assert isinstance(cache.layers[src], SourceLayer)
        assert cache.layers[src].compressed  # something was evicted
        for i in span:
            assert plan[i] == plan[src]
            assert torch.equal(cache.layers[i].token_idx, cache.layers[src].token_idx), (method, allocation, i)
            assert torch.equal(cache.layers[i].valid, cache.layers[src].valid)
            assert cache.layers[i].physical_length == cache.layers[src].physical_length


def test_given_plan_must_tie_a_span(make_model):
    model = make_model("llama")
    bad = BudgetPlan(budgets=(8, 8, 9, 8), base=8, allocation="given")
    with pytest.raises(ValueError, match=r"layers \[1, 2, 3\].*one budget"):
        _cache(model, [[1, 3]], plan=bad)
    _cache(model, [[1, 3]], plan=BudgetPlan(budgets=(9, 8, 8, 8), base=8, allocation="given"))


def test_tied_budgets_are_the_span_mean(make_model, make_ids, run_greedy):
    model = make_model("llama", layers=6)
    cache = _cache(model, [[2, 5]], method="streamingllm", budget=12, allocation="pyramid")
    run_greedy(model, make_ids(1, 40), cache=cache, new_tokens=2)
    untied, _ = squeezekv.registry.make_allocation("pyramid").allocate(12, 6)
    assert list(cache.plan.budgets[:2]) == untied[:2]
    assert set(cache.plan.budgets[2:]) == {round(sum(untied[2:]) / 4)}


# -- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spans,match", [
    ([[0, 2], [2, 3]], "overlap"),
    ([[3, 1]], "out of range"),
    ([[-1, 1]], "out of range"),
    ([[0, 1, 2]], "pair"),
    ([["a", 2]], "pair"),
    ("no-such-file.json", "no such file"),
    (5, "list"),
])
def test_bad_spans_raise(spans, match):
    with pytest.raises(ValueError, match=match):
        SharedAttention(spans=spans)


def test_span_out_of_model_range_raises(make_model):
    with pytest.raises(ValueError, match="out of range: the model has 4 layers"):
        _cache(make_model("llama"), [[2, 4]])


def test_span_over_a_sliding_layer_raises(make_model):
    # gemma3_text: even layers are sliding-window layers that squeezekv leaves to transformers
    with pytest.raises(ValueError, match="sliding_attention"):
        _cache(make_model("gemma3_text"), [[1, 3]])


def test_spans_from_analysis_json(tmp_path):
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps({"spans": [[4, 6], [1, 2]], "spans_by_count": {"2": [[5, 7]]}}))
    assert load_spans(str(path)) == ((1, 2), (4, 6))
    method = SharedAttention(spans=str(path), shared_layers=2)
    assert method.shared == [6, 7]
    with pytest.raises(ValueError, match="no proposal for shared_layers=3"):
        SharedAttention(spans=str(path), shared_layers=3)
    with pytest.raises(ValueError, match="needs spans= to be the JSON"):
        SharedAttention(spans=[[1, 2]], shared_layers=2)


@pytest.mark.real_weights
def test_default_model_sharing_with_eviction(run_greedy, same_generation):
    import os

    from squeezekv import assets

    try:
        assets.fetch(assets.SMOLLM2, allow_download=os.environ.get("SQUEEZEKV_OFFLINE") != "1")
        model, _ = assets.load_model(None)
    except (FileNotFoundError, OSError) as err:
        pytest.skip(f"default model not available offline: {err}")
    ids = torch.randint(1000, 20000, (1, 64), generator=torch.Generator().manual_seed(0))
    ref = run_greedy(model, ids, new_tokens=4)
    same_generation(ref, run_greedy(model, ids, cache=_cache(model, [[5, 5]]), new_tokens=4), atol=1e-4)
    cache = _cache(model, [[23, 26]], method="h2o", budget=16)
    run_greedy(model, ids, cache=cache, new_tokens=4)
    for i in (24, 25, 26):
        assert torch.equal(cache.layers[i].token_idx, cache.layers[23].token_idx)
        assert cache.layers[i].keys.numel() == 0
    assert cache.layers[23].physical_length <= 17


@pytest.mark.parametrize("method", ["h2o", "snapkv"])
def test_chunked_prefill_keeps_the_sources_tokens(method, make_model, make_ids):
    from squeezekv.prefill import chunked_prefill

    model = make_model("llama", layers=4)
    cache = _cache(model, [[1, 3]], method=method, budget=10)
    chunked_prefill(model, make_ids(2, 40), cache, chunk_size=12)
    for i in (2, 3):
        assert cache.layers[i].physical_length == 10
        assert torch.equal(cache.layers[i].token_idx, cache.layers[1].token_idx)


@pytest.mark.parametrize("spans", [(), []])
def test_spans_sharing_no_layer_are_refused(spans, make_model):
    # they used to be accepted and change nothing (`--crosslayer shared_attention` without spans was a silent no-op)
    with pytest.raises(ValueError, match="share no layer.*squeezekv analyze-layers"):
        SharedAttention(spans=spans)
    with pytest.raises(ValueError, match="share no layer"):
        _cache(make_model("llama"), spans)


def test_cli_shared_attention_without_spans_is_refused(capsys):
    from squeezekv.cli import main

    assert main(["run", "--crosslayer", "shared_attention", "--no-progress"]) == 2
    assert "share no layer" in capsys.readouterr().err


def test_analysis_json_without_proposed_spans_is_refused(tmp_path):
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps({"spans": [], "spans_by_count": {}}))
    with pytest.raises(ValueError, match="lower --threshold"):
        SharedAttention(spans=str(path))
