"""MiniCache (cross-layer KV merging): exactness when merging is off, the SLERP/magnitude formula, exact retained
tokens, bytes from allocated storage, and composition with eviction (both layers of a pair hold the same tokens)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import squeezekv
from squeezekv.crosslayer.minicache import MergedStates, MiniCache, MiniCacheLayer

PROMPT = 24
NEW = 12
BIG = 4096
H, D = 2, 16  # tiny llama: 2 KV heads of 16 dims


def _pairs(cache):
    out = []
    for layer in cache.layers:
        if isinstance(layer, MiniCacheLayer) and layer.which == 0:
            out.append(layer.pair)
    return out


def _minicache(model, method="window", budget=BIG, allocation="uniform", method_params=None, allocation_params=None,
               **params):
    return squeezekv.make_cache(model, method, budget, allocation, method_params=method_params,
                                allocation_params=allocation_params, crosslayer="minicache", crosslayer_params=params)


# -- merging off ---------------------------------------------------------------------------------------------------


def test_start_beyond_last_layer_merges_nothing_and_equals_full_cache(make_model, make_ids, run_greedy,
                                                                      same_generation):
    model = make_model("llama", layers=4)
    ids = make_ids(1, PROMPT)
    ref = run_greedy(model, ids, new_tokens=NEW)
    cache = _minicache(model, "snapkv", method_params={"window": 8}, start_layer=4)
    assert not any(isinstance(layer, MiniCacheLayer) for layer in cache.layers)
    same_generation(ref, run_greedy(model, ids, cache=cache, new_tokens=NEW))


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "leftpad2"])
def test_gamma_zero_retains_every_token_and_equals_full_cache(padded, make_model, make_ids, make_left_padded,
                                                              run_greedy, same_generation):
    """gamma = 0: every real token is retained for both layers, so merged pairs reproduce the model exactly, through
    the prefill, decoding, and the merging of decoded tokens (merge_every=3)."""
    model = make_model("llama", layers=4)
    ids, mask = make_left_padded([PROMPT, 15], PROMPT) if padded else (make_ids(1, PROMPT), None)
    ref = run_greedy(model, ids, mask, new_tokens=NEW)
    cache = _minicache(model, "snapkv", method_params={"window": 8}, start_layer=0, gamma=0.0, merge_every=3)
    same_generation(ref, run_greedy(model, ids, mask, cache=cache, new_tokens=NEW))
    pairs = _pairs(cache)
    assert [p.layer_ids for p in pairs] == [(0, 1), (2, 3)]
    for p in pairs:
        assert p.merged
        # NEW - 1 decoded tokens went through the cache: 9 merged in batches of 3, 2 still in the tail
        assert p.merged_length == PROMPT + 9 and p.layers[0].tail_length == 2
        real = int(mask.sum()) if padded else PROMPT
        assert p.keys.retained_count() == H * (real + 9 if not padded else real + 2 * 9)


def test_default_pairs_start_at_the_middle():
    m = MiniCache()
    assert m.pairs(30, tuple(range(30))) == [(15, 16), (17, 18), (19, 20), (21, 22), (23, 24), (25, 26), (27, 28)]
    assert MiniCache(start_layer=26).pairs(30, tuple(range(30))) == [(26, 27), (28, 29)]
    assert MiniCache(start_layer=30).pairs(30, tuple(range(30))) == []
    # hybrid models: only managed (full-attention) layers are paired
    assert MiniCache(start_layer=0).pairs(6, (1, 3, 5)) == [(1, 3)]


# -- the formula ---------------------------------------------------------------------------------------------------


def test_merge_of_planar_vectors_is_the_angle_interpolation():
    """2-D vectors at angles theta (layer l) and phi (layer l+1): SLERP's direction is at theta + t (phi - theta);
    each layer keeps its own length; the token whose angular distance passes the threshold is stored exactly."""
    theta = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.1])
    diff = torch.tensor([0.1, 0.2, 0.3, 1.5, 0.25])  # angular distances diff / pi
    phi = theta + diff
    ra = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    rb = torch.tensor([2.0, 0.7, 1.0, 0.2, 4.0])
    a = (ra[:, None] * torch.stack([theta.cos(), theta.sin()], -1))[None, None]  # [1, 1, 5, 2]
    b = (rb[:, None] * torch.stack([phi.cos(), phi.sin()], -1))[None, None]
    t, gamma = 0.6, 0.5
    st = MergedStates.merge(a, b, t, gamma)
    # threshold = d_min + (d_max - d_min) * gamma = (0.1 + 0.7) / pi: only token 3 (1.5 / pi) is retained
    torch.testing.assert_close(st.threshold, torch.tensor([[0.8 / math.pi]]), atol=1e-6, rtol=0)
    assert st.ret_pos.tolist() == [[[3]]]
    mid = theta + t * diff
    e = torch.stack([mid.cos(), mid.sin()], -1)
    torch.testing.assert_close(st.direction[0, 0], e, atol=1e-6, rtol=0)
    torch.testing.assert_close(st.norms[0][0, 0], ra, atol=1e-6, rtol=0)
    torch.testing.assert_close(st.norms[1][0, 0], rb, atol=1e-6, rtol=0)
    for which, (x, r) in enumerate([(a, ra), (b, rb)]):
        expected = r[:, None] * e
        expected[3] = x[0, 0, 3]
        got = st.reconstruct(which)[0, 0]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert torch.equal(got[3], x[0, 0, 3])


def test_merge_matches_the_paper_formula_on_random_vectors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 40, 16, generator=g)
    b = torch.randn(2, 3, 40, 16, generator=g)
    t, gamma = 0.6, 0.3
    st = MergedStates.merge(a, b, t, gamma)
    a64, b64 = a.double(), b.double()
    ua, ub = a64 / a64.norm(dim=-1, keepdim=True), b64 / b64.norm(dim=-1, keepdim=True)
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1, 1))
    e = torch.sin((1 - t) * omega) / torch.sin(omega) * ua + torch.sin(t * omega) / torch.sin(omega) * ub
    d = omega[..., 0] / math.pi
    thr = d.amin(-1) + (d.amax(-1) - d.amin(-1)) * gamma  # [B, H]
    retained = d >= thr[..., None]
    for which, x in enumerate([a64, b64]):
        expected = torch.where(retained[..., None], x, e * x.norm(dim=-1, keepdim=True)).float()
        torch.testing.assert_close(st.reconstruct(which), expected, atol=2e-6, rtol=0)
    # the retained set is exactly the paper's, padded to the largest count with -1
    assert st.retained_count() == int(retained.sum())
    assert st.retained_slots == int(retained.sum(-1).max())
    for bi in range(2):
        for hi in range(3):
            pos = st.ret_pos[bi, hi]
            assert pos[pos >= 0].tolist() == retained[bi, hi].nonzero().flatten().tolist()


def test_retained_tokens_are_the_model_keys_exactly(make_model, make_ids):
    """After a prefill, a merged pair's retained tokens are bit-identical to the stock cache's keys/values of each
    layer; every other token is direction * its own layer's magnitude."""
    model = make_model("llama", layers=4)
    ids = make_ids(1, PROMPT)
    ref = DynamicCache(config=model.config)
    model(ids, cache=ref)
    cache = _minicache(model, start_layer=2, gamma=0.5)
    model(ids, cache=cache)
    (pair,) = _pairs(cache)
    for which, layer_idx in enumerate(pair.layer_ids):
        for st, full in ((pair.keys, ref.layers[layer_idx].keys), (pair.values, ref.layers[layer_idx].values)):
            assert st.retained_count() > 0
            rec = st.reconstruct(which)
            used = st.ret_pos >= 0
            for hi in range(H):
                pos = st.ret_pos[0, hi][used[0, hi]].long()
                assert torch.equal(rec[0, hi, pos], full[0, hi, pos])
            torch.testing.assert_close(st.norms[which], full.norm(dim=-1), atol=1e-5, rtol=1e-6)
            merged = torch.ones(H, PROMPT, dtype=torch.bool)
            for hi in range(H):
                merged[hi, st.ret_pos[0, hi][used[0, hi]].long()] = False
            expected = st.direction[0] * full[0].norm(dim=-1, keepdim=True)
            torch.testing.assert_close(rec[0][merged], expected[merged], atol=1e-5, rtol=0)


# -- bytes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_bytes_equal_the_formula(gamma, make_model, make_ids):
    model = make_model("llama", layers=4)
    ids = make_ids(1, PROMPT)
    cache = _minicache(model, start_layer=2, gamma=gamma)  # "window": no scores
    model(ids, cache=cache)
    n, f32, i32 = PROMPT, 4, 4
    plain = 2 * H * n * D * f32  # K and V of one unmerged layer
    (pair,) = _pairs(cache)
    rk, rv = pair.keys.retained_slots, pair.values.retained_slots
    merged_kv = (
        2 * H * n * D * f32  # one shared direction tensor for K and one for V
        + 2 * 2 * H * n * f32  # per layer, per token: |k| and |v|
        + 2 * (rk + rv) * H * D * f32  # per layer: retained keys and values
    )
    bookkeeping = (rk + rv) * H * i32 + 2 * H * f32  # retained positions, thresholds (K and V)
    token_idx = 4 * H * n * i32
    assert cache.kv_nbytes() == 2 * plain + merged_kv
    assert cache.nbytes() == 2 * plain + merged_kv + bookkeeping + token_idx
    assert sum(cache.layer_nbytes()) == cache.nbytes()
    assert cache.physical_lengths() == [n] * 4
    if gamma == 1.0:  # only the most distant token of each head is kept unmerged: the pair nearly halves
        assert rk == rv == 1
        assert merged_kv < 0.61 * (2 * plain)  # 1/2 + norms (2/D) + 2 retained of 24 per head
    if gamma == 0.0:  # everything retained: merging costs more than it saves
        assert rk == rv == n
        assert merged_kv > 2 * plain


# -- composition with eviction -------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocation", ["uniform", "pyramid", "squeeze"])
@pytest.mark.parametrize("method", ["h2o", "snapkv", "streamingllm", "window"])
def test_eviction_keeps_identical_tokens_in_both_layers_of_a_pair(method, allocation, make_model, make_ids):
    model = make_model("llama", layers=4)
    ids = make_ids(1, PROMPT)
    params = {"snapkv": {"window": 4}, "streamingllm": {"sinks": 2}}.get(method, {})
    alloc_params = {"beta": 2.0} if allocation == "pyramid" else None  # budgets 24, 19, 13, 8: pairs differ
    cache = _minicache(model, method, 16, allocation, method_params=params, allocation_params=alloc_params,
                       start_layer=0, gamma=0.5, merge_every=3)
    model(ids, cache=cache)
    for step in range(NEW):
        model(make_ids(1, 1, seed=50 + step), cache=cache)
        for pair in _pairs(cache):
            first, second = pair.layers
            assert torch.equal(first.token_idx, second.token_idx)
            assert first.physical_length == second.physical_length
            assert pair.merged_length + first.tail_length == first.token_idx.shape[-1]
            if pair.merged:
                assert pair.keys.ret_pos.max() < pair.merged_length
    evicted = 0
    for pair in _pairs(cache):
        first, second = pair.layers
        budget = cache.plan[pair.layer_ids[0]]  # the pair's budget is its first layer's
        if budget < PROMPT:
            evicted += 1
            assert first.compressed and second.compressed
            if method == "snapkv":  # evicts once after the prompt; decoded tokens are appended
                assert first.physical_length == budget + NEW
            else:  # keeps evicting: back to the budget after every step
                assert first.physical_length == budget
    assert evicted >= 1


@pytest.mark.parametrize("method", ["streamingllm", "window"])
def test_positional_policies_keep_the_same_tokens_as_without_merging(method, make_model, make_ids):
    """Position-only policies choose the same tokens whether or not layers are merged."""
    model = make_model("llama", layers=4)
    ids = make_ids(1, PROMPT)
    caches = [squeezekv.make_cache(model, method, 10, allocation="uniform"),
              _minicache(model, method, 10, start_layer=0, gamma=0.5)]
    for cache in caches:
        model(ids, cache=cache)
        for step in range(5):
            model(make_ids(1, 1, seed=70 + step), cache=cache)
    for i in range(4):
        assert torch.equal(caches[0].layers[i].token_idx, caches[1].layers[i].token_idx)


def test_merged_tail_and_eviction_bookkeeping(make_model, make_ids):
    """Decoded tokens stay unmerged until merge_every of them arrived; eviction merges the tail first."""
    model = make_model("llama", layers=2)
    cache = _minicache(model, "none", 8, start_layer=0, gamma=0.5, merge_every=4)  # 'none': the budget is ignored
    model(make_ids(1, PROMPT), cache=cache)
    (pair,) = _pairs(cache)
    lengths = []
    for step in range(9):
        model(make_ids(1, 1, seed=90 + step), cache=cache)
        lengths.append((pair.merged_length, pair.layers[0].tail_length))
    assert lengths == [(24, 1), (24, 2), (24, 3), (28, 0), (28, 1), (28, 2), (28, 3), (32, 0), (32, 1)]
    assert torch.equal(pair.layers[0].token_idx[0, 0], torch.arange(PROMPT + 9, dtype=torch.int32))


def test_reorder_cache_moves_the_merged_storage(make_model, make_ids):
    model = make_model("llama", layers=2)
    cache = _minicache(model, start_layer=0, gamma=0.5)
    model(make_ids(2, PROMPT), cache=cache)
    (pair,) = _pairs(cache)
    before = [pair.keys.reconstruct(w).clone() for w in (0, 1)]
    cache.reorder_cache(torch.tensor([1, 0]))
    for w in (0, 1):
        assert torch.equal(pair.keys.reconstruct(w), before[w].flip(0))


# -- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [
    {"t": 1.5}, {"t": -0.1}, {"gamma": 2.0}, {"gamma": -0.01}, {"start_layer": -1}, {"start_layer": 1.5},
    {"merge_every": 0}, {"merge_every": True}, {"alpha": 1},
])
def test_bad_parameters_raise(params, make_model):
    with pytest.raises(ValueError):
        _minicache(make_model("llama", layers=2), **params)


def test_graph_decoding_is_refused(make_model, make_ids):
    from squeezekv.graphs import GraphDecoder

    model = make_model("llama", layers=2)
    cache = _minicache(model, "window", 8, start_layer=0)
    model(make_ids(1, PROMPT), cache=cache)
    with pytest.raises(ValueError, match="minicache"):
        GraphDecoder(model, cache, use_graph=False)


def test_chunked_prefill_with_every_token_retained_equals_the_model(make_model, make_ids):
    """Each chunk is merged at its end; the next chunk attends to the rebuilt keys/values (exact when gamma = 0)."""
    model = make_model("llama", layers=4)
    ids = make_ids(1, PROMPT)
    ref = model(ids).logits[:, -1]
    cache = _minicache(model, "none", BIG, start_layer=0, gamma=0.0)
    logits = squeezekv.chunked_prefill(model, ids, cache, 7)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    for pair in _pairs(cache):
        assert pair.merged_length == PROMPT and pair.layers[0].tail_length == 0


# -- real weights --------------------------------------------------------------------------------------------------


@pytest.mark.real_weights
def test_default_model_bytes_and_exactness():
    """SmolLM2-135M (30 layers, 3 KV heads, head dim 64, float32): merging the last 4 layers without retention stores
    exactly the formula's bytes; with every token retained (gamma = 0) the logits are the stock model's."""
    import os

    from squeezekv import assets

    try:
        assets.fetch(assets.SMOLLM2, allow_download=os.environ.get("SQUEEZEKV_OFFLINE") != "1")
        model, _ = assets.load_model()
    except (FileNotFoundError, OSError) as err:
        pytest.skip(f"default model not available offline: {err}")
    ids = torch.randint(100, 20000, (1, 48), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    cache = _minicache(model, "none", 1.0, start_layer=26, gamma=1.0)
    model(ids, cache=cache)
    pairs = _pairs(cache)
    assert [p.layer_ids for p in pairs] == [(26, 27), (28, 29)]
    n, h, d = 48, 3, 64
    r = [(p.keys.retained_slots, p.values.retained_slots) for p in pairs]
    assert r == [(1, 1), (1, 1)]  # gamma = 1: only the most distant token of each head
    pair_kv = 2 * h * n * d * 4 + 4 * h * n * 4 + 2 * (1 + 1) * h * d * 4
    assert cache.kv_nbytes() == 26 * 2 * h * n * d * 4 + 2 * pair_kv
    cache = _minicache(model, "none", 1.0, start_layer=0, gamma=0.0)
    out = model(ids, cache=cache).logits
    nxt = torch.tensor([[1234]])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(model(nxt, cache=cache).logits[:, -1], model(torch.cat([ids, nxt], 1)).logits[:, -1],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("start_layer", [0, None])
@pytest.mark.parametrize("allocation", ["uniform", "pyramid", "squeeze"])
@pytest.mark.parametrize("method", ["snapkv", "h2o", "window"])
def test_every_layer_holds_the_tokens_its_plan_says(method, allocation, start_layer, make_model, make_ids):
    """Both layers of a pair hold the same tokens, so the plan gives a pair one budget (issue 18, item 8: under a
    non-uniform allocation the plan said 200 tokens and the layers held 232): per layer and in total, what is held is
    what the plan says, after the prompt and while decoding."""
    model = make_model("llama", layers=4)
    params = {"snapkv": {"window": 4}}.get(method, {})
    alloc_params = {"pyramid": {"beta": 2.0}, "squeeze": {"p": 0.5}}.get(allocation)
    cache = _minicache(model, method, 12, allocation, method_params=params, allocation_params=alloc_params,
                       start_layer=start_layer, gamma=0.5, merge_every=3)
    model(make_ids(1, PROMPT), cache=cache)
    plan = cache.plan
    pairs = [p.layer_ids for p in _pairs(cache)]
    assert pairs and plan.details["tied_layers"] == [list(p) for p in pairs]
    for a, b in pairs:
        assert plan[a] == plan[b]
    assert all(b <= PROMPT for b in plan.budgets)
    assert cache.physical_lengths() == list(plan.budgets)
    assert sum(cache.physical_lengths()) == plan.total
    for step in range(4):
        model(make_ids(1, 1, seed=60 + step), cache=cache)
    grown = 4 if method == "snapkv" else 0  # SnapKV evicts once, after the prompt; the others keep evicting
    assert cache.physical_lengths() == [b + grown for b in plan.budgets]
