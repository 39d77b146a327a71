"""Low-bit KV storage (channel methods ``kivi`` and ``coupled``): packing, quantisation error bounds, bytes, block
attention against a reference, exactness when nothing is quantised, and composition with every eviction policy."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import squeezekv
from squeezekv.attention_math import eager, weight_chunks
from squeezekv.channel import coupled as cq
from squeezekv.channel import quantized
from squeezekv.channel.kivi import quantize
from squeezekv.channel.packing import pack, packed_size, unpack

POLICIES = squeezekv.policy_names()
PROMPT = 40
NEW = 10
D = 16  # head dim of the tiny models (hidden 64 / 4 heads)
KIVI_SMALL = {"bits": 2, "group_size": 8, "residual": 8}


def _coupled_books(model, bits: int = 1, channels: int = 4) -> dict:
    """Codebooks of a tiny model calibrated on random token ids other than the test prompts'."""
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(99))
    return cq.calibrate(model, ids, bits, channels, iters=10)


def _coupled_params(model, tmp_path, bits: int = 1, channels: int = 4, residual: int = 0) -> dict:
    path = tmp_path / f"cq{bits}_{channels}.pt"
    if not path.exists():
        cq.save_codebooks(_coupled_books(model, bits, channels), path, bits, channels)  # explicit calibration
    return {"bits": bits, "channels": channels, "residual": residual, "calibration": str(path)}


def _teacher_forced(model, cache, ids: torch.Tensor, prompt: int, chunk: int = 0) -> list[torch.Tensor]:
    """Logits of the prompt's last token, of an optional chunk, then of each further token fed one at a time."""
    out = [model(ids[:, :prompt], cache=cache).logits[:, -1]]
    pos = prompt
    if chunk:
        out.append(model(ids[:, pos:pos + chunk], cache=cache).logits[:, -1])
        pos += chunk
    for t in range(pos, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], cache=cache).logits[:, -1])
    return out


def _full_values(layer) -> torch.Tensor:
    if layer.nq == 0:
        return layer.values
    return torch.cat([layer._dequant(slice(0, layer.nq))[1], layer.values], dim=2)


# -- packing --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_packing_round_trips_exactly(bits):
    codes = torch.randint(0, 1 << bits, (3, 2, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)
    assert packed_size(64, bits) == 64 * bits // 8


def test_packing_layout_is_little_endian_within_a_byte():
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0b10000001]


@pytest.mark.parametrize("bits,n", [(3, 8), (2, 6), (0, 8)])
def test_packing_rejects_bad_widths(bits, n):
    with pytest.raises(ValueError):
        pack(torch.zeros(n, dtype=torch.uint8), bits)


# -- quantisation error ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_error_within_half_a_step(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 16, generator=g) * torch.linspace(0.1, 8, 16)  # channels of very different ranges
    x[0, :, 3] = 1.5  # a constant channel: scale 0, must be exact
    codes, scale, zero = quantize(x, bits, dim=1, store_dtype=torch.float32)
    assert codes.max() <= (1 << bits) - 1
    deq = codes.float() * scale + zero
    err = (deq - x).abs()
    assert (err <= scale / 2 + 1e-6).all()
    assert torch.equal(deq[0, :, 3], x[0, :, 3])
    # the step is (max - min) / (2**bits - 1) of each channel's group
    torch.testing.assert_close(scale, (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / ((1 << bits) - 1))


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_layer_stores_keys_per_channel_and_values_per_token_within_bound(bits, make_model, make_ids):
    """After a prompt (no eviction, residual 8): every quantised key is within half a step of its channel's group
    of 8 tokens, every value within half a step of its token's group of 8 channels; the residual is exact."""
    model = make_model("llama")
    ids = make_ids(2, PROMPT)
    ref = DynamicCache(config=model.config)
    model(ids, cache=ref)
    cache = squeezekv.make_cache(model, "window", 4096, channel="kivi",
                                 channel_params={"bits": bits, "group_size": 8, "residual": 8})
    model(ids, cache=cache)
    qmax = (1 << bits) - 1
    for i in cache.managed:
        layer, k, v = cache.layers[i], ref.layers[i].keys, ref.layers[i].values  # [B, H, 40, D]
        assert layer.nq == 32 and layer.residual_length == 8  # (40 - 8) // 8 groups of 8 quantised
        kg = k[:, :, :32].reshape(2, 2, 4, 8, D)
        kstep = (kg.amax(3, keepdim=True) - kg.amin(3, keepdim=True)) / qmax
        kerr = (layer.attention_keys()[:, :, :32].reshape(2, 2, 4, 8, D) - kg).abs()
        assert (kerr <= kstep / 2 + 1e-5).all()
        vg = v[:, :, :32].reshape(2, 2, 32, D // 8, 8)
        vstep = (vg.amax(4, keepdim=True) - vg.amin(4, keepdim=True)) / qmax
        verr = (_full_values(layer)[:, :, :32].reshape(2, 2, 32, D // 8, 8) - vg).abs()
        assert (verr <= vstep / 2 + 1e-5).all()
        assert torch.equal(layer.keys, k[:, :, 32:]) and torch.equal(layer.values, v[:, :, 32:])
        assert verr.max() > 0  # something was really quantised


# -- exactness when nothing is quantised ----------------------------------------------------------------------------
@pytest.mark.parametrize("channel", ["kivi", "coupled"])
def test_residual_covering_the_sequence_reproduces_the_full_cache(channel, make_model, make_left_padded, run_greedy,
                                                                   same_generation, tmp_path):
    model = make_model("llama")
    ids, mask = make_left_padded([PROMPT, 29, 17], PROMPT)
    ref = run_greedy(model, ids, mask, new_tokens=NEW)
    params = ({"residual": 4096, "group_size": 8} if channel == "kivi"
              else _coupled_params(model, tmp_path, residual=4096))
    cache = squeezekv.make_cache(model, "h2o", 4096, "squeeze", channel=channel, channel_params=params)
    same_generation(ref, run_greedy(model, ids, mask, cache=cache, new_tokens=NEW))
    assert all(cache.layers[i].nq == 0 for i in cache.managed)


# -- attention over quantised storage -------------------------------------------------------------------------------
@pytest.mark.parametrize("channel", ["kivi", "coupled"])
@pytest.mark.parametrize("q_len", [1, 5])
def test_block_attention_equals_attention_over_the_dequantised_cache(channel, q_len, make_model, make_ids, tmp_path,
                                                                     monkeypatch):
    """The online-softmax block attention (several blocks) equals eager attention over the explicitly dequantised
    keys/values, with and without an eviction mask; so do the weights handed to H2O."""
    monkeypatch.setattr(quantized, "BLOCK_ELEMS", 2 * 4 * D)  # blocks of a few tokens
    model = make_model("llama")
    params = KIVI_SMALL if channel == "kivi" else _coupled_params(model, tmp_path, residual=3)
    ids = make_ids(2, PROMPT + 8)
    for policy, budget in (("window", 4096), ("h2o", 30)):
        cache = squeezekv.make_cache(model, policy, budget, "uniform", channel=channel, channel_params=params)
        model(ids[:, :PROMPT], cache=cache)
        model(ids[:, PROMPT:PROMPT + q_len], cache=cache)
        layer = cache.layers[1]
        assert layer.nq > 0 and layer.physical_length == min(budget, PROMPT + q_len)
        query = torch.randn(2, 4, q_len, D)
        layer.set_padding(None)
        allowed = layer.allowed(q_len, None)
        if allowed is None and q_len > 1:
            n = layer.physical_length
            allowed = torch.arange(n)[None, :] <= torch.arange(n - q_len, n)[:, None]
            allowed = allowed[None, None]
        keys, values = layer.attention_keys(), _full_values(layer)
        ref = eager(query, keys, values, allowed, 0.25)
        torch.testing.assert_close(layer.attend(query, None, None, layer.allowed(q_len, None), 0.25), ref,
                                   atol=1e-5, rtol=0)
        got = torch.cat([w for _, _, w in layer.weight_chunks(query, None, layer.allowed(q_len, None), 0.25)], dim=3)
        want = torch.cat([w for _, _, w in weight_chunks(query, keys, allowed, 0.25)], dim=3)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_kivi_greedy_is_close_and_batch_rows_are_independent(make_model, make_ids):
    model = make_model("llama")
    ids = make_ids(2, PROMPT + NEW)
    both = _teacher_forced(model, squeezekv.make_cache(model, "window", 4096, channel="kivi",
                                                       channel_params=KIVI_SMALL), ids, PROMPT)
    alone = _teacher_forced(model, squeezekv.make_cache(model, "window", 4096, channel="kivi",
                                                        channel_params=KIVI_SMALL), ids[1:], PROMPT)
    for a, b in zip(both, alone):
        torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)


# -- bytes ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("method", ["window", "h2o"])
def test_kivi_bytes_equal_the_formula(bits, method, make_model, make_ids):
    model = make_model("llama")
    batch, g, r = 2, 8, 8
    cache = squeezekv.make_cache(model, method, 4096, channel="kivi",
                                 channel_params={"bits": bits, "group_size": g, "residual": r})
    model(make_ids(batch, PROMPT), cache=cache)
    h, es = 2, 4  # KV heads, float32
    nq = (PROMPT - r) // g * g
    per_q = D * bits // 8 * 2 + 2 * (D // g) * es  # codes of K and V, value scales/zeros
    groups = nq // g * 2 * D * es  # key scales/zeros per group
    bookkeeping = 4 + (4 if method == "h2o" else 0)  # token_idx (+ H2O's float32 score)
    expected = batch * h * (nq * per_q + groups + (PROMPT - nq) * 2 * D * es + PROMPT * bookkeeping)
    for i in cache.managed:
        assert cache.layers[i].nbytes() == expected
    assert cache.nbytes() == expected * len(cache.managed)
    m = squeezekv.registry.make_channel("kivi", bits=bits, group_size=g)
    assert m.bytes_per_token(D, h, es) * nq * batch + batch * h * (PROMPT - nq) * 2 * D * es \
        == cache.kv_nbytes() / len(cache.managed)


@pytest.mark.parametrize("bits,channels", [(1, 4), (2, 2), (1, 8)])
def test_coupled_bytes_equal_the_formula(bits, channels, make_model, make_ids, tmp_path):
    model = make_model("llama")
    if channels == 8:  # 256 centroids need 256 points: calibrate on 4 x 64 random tokens, points repeat
        books = cq.calibrate(model, torch.randint(3, 128, (5, 64), generator=torch.Generator().manual_seed(3)),
                             bits, channels, iters=3)
        path = tmp_path / "cq.pt"
        m = cq.CoupledQuant(bits=bits, channels=channels)
        m.set_codebooks(books)
        m.save(path)
        params = {"bits": bits, "channels": channels, "calibration": str(path)}
    else:
        params = _coupled_params(model, tmp_path, bits, channels)
    cache = squeezekv.make_cache(model, "window", 4096, channel="coupled", channel_params=params)
    model(make_ids(2, PROMPT), cache=cache)
    expected = 2 * 2 * PROMPT * (2 * D * bits // 8 + 4)  # codes of K and V + token_idx; residual 0
    assert [cache.layers[i].nbytes() for i in cache.managed] == [expected] * len(cache.managed)


# -- coupled quantisation -------------------------------------------------------------------------------------------
def test_kmeans_finds_the_clusters_of_a_known_dataset():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    offsets = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5], [0.3, 0.3], [-0.3, -0.3]])
    a = (centers[:, None] + offsets[None]).reshape(-1, 2)  # 24 points, cluster means = centers
    b = a * 2 + 1
    cent = cq.kmeans(torch.stack([a, b]), 4, iters=20, seed=0)  # two independent groups at once
    for got, want in ((cent[0], centers), (cent[1], centers * 2 + 1)):
        order = lambda c: c[torch.argsort(c[:, 0] * 100 + c[:, 1])]  # noqa: E731
        torch.testing.assert_close(order(got), order(want), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        cq.kmeans(a[None], 25)


def test_coupled_codes_are_the_nearest_centroids(make_model, make_ids, tmp_path):
    """Every stored group of 4 channels decodes to its nearest centroid (brute force over the codebook)."""
    model = make_model("llama")
    params = _coupled_params(model, tmp_path, bits=1, channels=4)
    ids = make_ids(1, PROMPT)
    ref = DynamicCache(config=model.config)
    model(ids, cache=ref)
    cache = squeezekv.make_cache(model, "window", 4096, channel="coupled", channel_params=params)
    model(ids, cache=cache)
    for i in cache.managed:
        layer = cache.layers[i]
        for got, orig, book in ((layer.attention_keys(), ref.layers[i].keys, layer.kbook),
                                (_full_values(layer), ref.layers[i].values, layer.vbook)):
            x = orig.reshape(1, 2, PROMPT, D // 4, 4)  # [B, H, n, groups, c]
            d = ((x[..., None, :] - book[None, :, None]) ** 2).sum(-1)  # [B, H, n, groups, 16]
            want = torch.gather(book[None, :, None].expand(1, 2, PROMPT, -1, -1, -1), 4,
                                d.argmin(-1)[..., None, None].expand(-1, -1, -1, -1, 1, 4)).squeeze(4)
            torch.testing.assert_close(got, want.reshape(1, 2, PROMPT, D), atol=1e-6, rtol=0)


def test_coupled_calibration_file_round_trip_and_mismatch(make_model, tmp_path):
    model = make_model("llama")
    params = _coupled_params(model, tmp_path, bits=1, channels=4)
    m = squeezekv.registry.make_channel("coupled", **params)
    m.prepare(model)
    books = _coupled_books(model, 1, 4)
    assert sorted(m._books) == list(range(4))
    for i in range(4):
        torch.testing.assert_close(m._books[i][0], books[i][0], atol=0, rtol=0)
    other = squeezekv.registry.make_channel("coupled", bits=2, channels=2, calibration=params["calibration"])
    with pytest.raises(ValueError, match="bits=1"):
        other.prepare(model)


@pytest.mark.parametrize("params", [{"bits": 1, "channels": 4}, {"bits": 1, "channels": 4, "calibration": None},
                                    {"bits": 1, "channels": 4, "calibration": "/no/such/cq.pt"}])
def test_coupled_without_a_calibration_file_raises_and_never_calibrates(make_model, monkeypatch, params):
    """make_cache never calibrates: no file (or a missing one) is a ValueError naming the parameter and the command
    that makes the file, with no tokenizer loaded by model name and no k-means run."""
    import transformers

    model = make_model("llama")
    calls = []

    def forbidden(name):
        def record(*a, **k):
            calls.append(name)
            raise RuntimeError(f"{name} called")
        return record

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden("AutoTokenizer.from_pretrained"))
    for fn in ("kmeans", "learn_codebooks", "collect_kv", "calibration_ids", "calibrate"):
        monkeypatch.setattr(cq, fn, forbidden(fn))
    with pytest.raises(ValueError, match=r"calibration.*squeezekv calibrate-cq --out FILE") as err:
        squeezekv.make_cache(model, "window", 8, channel="coupled", channel_params=params)
    assert "channel_params={'calibration': FILE}" in str(err.value)
    if params.get("calibration"):
        assert params["calibration"] in str(err.value)
    assert calls == []


# -- composition with eviction --------------------------------------------------------------------------------------
def _token_idx(cache) -> list[torch.Tensor]:
    return [cache.layers[i].token_idx.clone() for i in cache.managed]


@pytest.mark.parametrize("method", POLICIES)
@pytest.mark.parametrize("channel", ["kivi", "coupled"])
def test_eviction_keeps_the_same_tokens_with_and_without_quantisation(method, channel, make_model, make_ids,
                                                                      method_params, tmp_path):
    """Evict first, quantise the survivors: after the prompt every policy keeps exactly the tokens it keeps without
    quantisation; while decoding, position-based policies (window, StreamingLLM) and SnapKV (which only evicts the
    prompt) keep exactly the same tokens at every step. H2O's later choices depend on attention weights, which
    quantised keys change: for H2O only the prompt's eviction is compared."""
    model = make_model("llama")
    params = KIVI_SMALL if channel == "kivi" else _coupled_params(model, tmp_path, residual=2)
    ids = make_ids(2, PROMPT + NEW)
    budget = 24
    plain = squeezekv.make_cache(model, method, budget, method_params=method_params(method))
    quant = squeezekv.make_cache(model, method, budget, method_params=method_params(method), channel=channel,
                                 channel_params=params)
    steps = [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, PROMPT + NEW)]
    for k, (a, b) in enumerate(steps):
        model(ids[:, a:b], cache=plain)
        model(ids[:, a:b], cache=quant)
        if method == "h2o" and k > 0:
            break
        for x, y in zip(_token_idx(plain), _token_idx(quant)):
            assert torch.equal(x, y), (method, k)
    assert any(cache_layer.nq > 0 for cache_layer in quant.layers)
    if method == "none":
        assert all(layer.physical_length == PROMPT + NEW for layer in quant.layers)


@pytest.mark.parametrize("method", POLICIES)
def test_eviction_with_kivi_keeps_each_token_within_the_quantisation_bound(method, make_model, make_ids,
                                                                            method_params):
    """Prompt, a chunk of 6 tokens, then single tokens, under eviction (H2O evicts different tokens in different
    heads, so some heads' quantised tokens move back to the residual and are quantised again): every held key/value
    stays within one quantisation step (of its head's whole range) of the true key/value of the token it claims to
    be, and the budget holds. (True keys/values: the full cache's; for the tokens after the prompt only in layer 0,
    whose keys/values do not depend on the attention of earlier layers.)"""
    model = make_model("llama")
    ids = make_ids(2, PROMPT + 6 + NEW)
    ref = DynamicCache(config=model.config)
    model(ids, cache=ref)
    cache = squeezekv.make_cache(model, method, 20, method_params=method_params(method), channel="kivi",
                                 channel_params={"bits": 4, "group_size": 8, "residual": 4}, allocation="uniform")
    _teacher_forced(model, cache, ids, PROMPT, chunk=6)
    qmax = 15
    for i in cache.managed:
        layer = cache.layers[i]
        grows = 0 if cache.policy.keeps_evicting else NEW  # SnapKV evicts the prompt (and the chunk) only
        held = 20 + grows if cache.policy.evicts else PROMPT + 6 + NEW  # 'none' keeps every token
        assert layer.physical_length == held and layer.nq > 0
        idx = layer.token_idx.long()  # [B, H, n]
        for got, full in ((layer.attention_keys(), ref.layers[i].keys), (_full_values(layer), ref.layers[i].values)):
            want = full.gather(2, idx[..., None].expand(-1, -1, -1, D))
            step = (full.amax(dim=(2, 3)) - full.amin(dim=(2, 3)))[..., None, None] / qmax  # [B, H, 1, 1]
            exact_ref = (idx < PROMPT) | (i == 0)  # [B, H, n]
            assert (((got - want).abs() <= step + 1e-5) | ~exact_ref[..., None]).all()
        assert (layer.token_idx[..., 1:] > layer.token_idx[..., :-1]).all()


def test_kivi_decodes_with_squeeze_allocation_and_eviction(make_model, make_ids):
    """Eviction 30% x KIVI 2-bit x SqueezeAttention: the plan is resolved first, every layer evicts to its budget,
    then quantises; bytes shrink accordingly."""
    model = make_model("llama")
    ids = make_ids(1, 160 + NEW)
    cache = squeezekv.make_cache(model, "streamingllm", 0.3, "squeeze", channel="kivi",
                                 channel_params={"bits": 2, "group_size": 8, "residual": 8})
    plain = squeezekv.make_cache(model, "streamingllm", 0.3, "squeeze")
    _teacher_forced(model, cache, ids, 160)
    _teacher_forced(model, plain, ids, 160)
    assert cache.plan.budgets == plain.plan.budgets
    for i in cache.managed:
        assert cache.layers[i].physical_length == plain.layers[i].physical_length
    assert cache.kv_nbytes() < 0.6 * plain.kv_nbytes()


# -- parameters -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channel,params", [
    ("kivi", {"bits": 3}), ("kivi", {"bits": 8}), ("kivi", {"group_size": 0}), ("kivi", {"residual": -1}),
    ("kivi", {"nope": 1}), ("coupled", {"bits": 3}), ("coupled", {"bits": 1, "channels": 3}),
    ("coupled", {"bits": 2, "channels": 8}), ("coupled", {"residual": -2}), ("coupled", {"calib_tokens": 4096}),
])
def test_bad_parameters_raise(channel, params):
    with pytest.raises(ValueError):
        squeezekv.registry.make_channel(channel, **params)


def test_group_size_must_divide_the_head_dim(make_model, make_ids):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "window", 64, channel="kivi", channel_params={"group_size": 32})
    with pytest.raises(ValueError, match="group_size=32"):
        model(make_ids(1, 8), cache=cache)


def test_static_decoding_is_refused(make_model, make_ids):
    from squeezekv.graphs import GraphDecoder

    model = make_model("llama")
    cache = squeezekv.make_cache(model, "window", 16, channel="kivi", channel_params=KIVI_SMALL)
    model(make_ids(1, 20), cache=cache)
    with pytest.raises(ValueError, match="static .*channel method 'kivi'"):
        GraphDecoder(model, cache, chunk=4, use_graph=False)


def test_heads_keeping_different_numbers_of_quantised_tokens(make_model, make_ids):
    """H2O-like eviction where head 0 keeps old (quantised) tokens and head 1 new (residual) ones: the split stays
    uniform, head 0's extra quantised tokens move back to the residual dequantised (values unchanged, keys
    requantised within one step of their channel's range), the key group table is compacted."""
    model = make_model("llama")
    ids = make_ids(1, PROMPT)
    ref = DynamicCache(config=model.config)
    model(ids, cache=ref)
    cache = squeezekv.make_cache(model, "h2o", 4096, channel="kivi",
                                 channel_params={"bits": 2, "group_size": 4, "residual": 8})
    model(ids, cache=cache)
    layer = cache.layers[2]
    assert layer.nq == 32 and layer.kscale.shape[2] == 8
    before_v = _full_values(layer)
    pos = torch.arange(PROMPT, dtype=torch.float32)
    layer.scores = torch.stack([PROMPT - pos, pos], dim=0)[None]  # head 0 favours old tokens, head 1 new ones
    layer.compress(20)  # h2o: 10 most recent + 10 best scored per head
    keep0 = list(range(10)) + list(range(30, 40))
    keep1 = list(range(20, 40))
    assert layer.token_idx[0].tolist() == [keep0, keep1]
    # head 1 keeps 12 quantised tokens (20..31) and head 0 10 (0..9): the uniform split is 10
    assert layer.physical_length == 20
    assert layer.nq + layer.residual_length == 20 and layer.residual_length < 8 + 4
    assert layer.kgid is not None and layer.kgid.dtype == torch.int16
    assert layer.kscale.shape[2] == int(layer.kgid.max()) + 1 == len(torch.unique(layer.kgid.reshape(-1)))
    idx = layer.token_idx.long()
    torch.testing.assert_close(_full_values(layer), before_v.gather(2, idx[..., None].expand(-1, -1, -1, D)),
                               atol=1e-5, rtol=0)
    k = ref.layers[2].keys  # [1, 2, 40, D]
    step = (k.amax(2, keepdim=True) - k.amin(2, keepdim=True)) / 3  # per channel, whole prompt
    err = (layer.attention_keys() - k.gather(2, idx[..., None].expand(-1, -1, -1, D))).abs()
    assert (err <= step + 1e-5).all()
    # decoding goes on from this state
    model(make_ids(1, 1, seed=7), cache=cache)  # the plan's budget (4096) evicts nothing more
    assert layer.physical_length == 21 and layer.token_idx[0, :, -1].tolist() == [PROMPT, PROMPT]


def test_cli_calibrate_cq_reports_user_errors(tmp_path, capsys):
    from squeezekv.cli import main

    assert main(["calibrate-cq", "--out", str(tmp_path / "c.pt"), "--bits", "3"]) == 2
    assert "bits=3" in capsys.readouterr().err


def test_calibration_pages_are_disjoint_from_the_evaluations(tmp_path, monkeypatch):
    """$SQUEEZEKV_LINUX_DOC is honoured by the evaluation and both calibrations; calibrations read only pages shorter
    than the evaluation's minimum (CQ from 2,000 characters, Eigen from 4,000), translations never."""
    from squeezekv.channel import eigen_calibrate
    from squeezekv.eval.data import EVAL_MIN_CHARS, load_linux_docs

    sizes = {"a.rst.txt": 1000, "b.rst.txt": 3000, "c.rst.txt": 5000, "d.rst.txt": EVAL_MIN_CHARS,
             "translations/e.rst.txt": 5000}
    for name, n in sizes.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x" * n)
    monkeypatch.setenv("SQUEEZEKV_LINUX_DOC", str(tmp_path))
    assert [p for p, _ in load_linux_docs()] == ["d.rst.txt"]
    assert [p for p, _ in cq.calibration_texts()] == ["b.rst.txt", "c.rst.txt"]
    assert [p for p, _ in eigen_calibrate.calibration_texts()] == ["c.rst.txt"]
    monkeypatch.setenv("SQUEEZEKV_LINUX_DOC", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="calibration file"):
        cq.calibration_texts()
