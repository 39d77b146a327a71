"""Shared Attention composed with the quantising channel methods (``kivi``, ``coupled``): a span's source layer stores
quantised keys+values and hands on its softmax weights over every held position; its shared layers store quantised
values only. Exactness when nothing is quantised, a hand reference over explicitly dequantised keys/values, eviction
that keeps every layer of a span on the same tokens (and the same quantised/residual split), bytes, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

import squeezekv
from squeezekv.channel import coupled as cq
from squeezekv.channel.kivi import KIVILayer, quantize
from squeezekv.crosslayer.shared_attention import SharedLayer, SourceLayer

PROMPT = 24
NEW = 12
BIG = 4096
D = 16  # head dim of the tiny models (hidden 64 / 4 heads)
KIVI_ON = {"bits": 2, "group_size": 8, "residual": 8}
KIVI_OFF = {"bits": 2, "group_size": 8, "residual": BIG}  # residual longer than prompt + decode: nothing quantised


def _coupled_params(model, tmp_path, residual: int = 0) -> dict:
    """CQ 1 bit x 4 channels, codebooks calibrated on random ids other than the test prompts'."""
    path = tmp_path / "cq.pt"
    if not path.exists():
        ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(99))
        cq.save_codebooks(cq.calibrate(model, ids, 1, 4, iters=10), path, bits=1, channels=4)
    return {"bits": 1, "channels": 4, "residual": residual, "calibration": str(path)}


def _cache(model, spans, channel=None, channel_params=None, method="window", budget=BIG, allocation="uniform",
           method_params=None, **kw):
    params = method_params or ({"window": 4} if method == "snapkv" else {})
    cross = {} if spans is None else {"crosslayer": "shared_attention", "crosslayer_params": {"spans": spans}}
    return squeezekv.make_cache(model, method, budget, allocation, method_params=params, channel=channel,
                                channel_params=channel_params, **cross, **kw)


def _teacher_forced(model, cache, ids: torch.Tensor, prompt: int, mask: torch.Tensor | None = None):
    """Logits ``[B, V]`` of the prompt's last token, then of each further token of ``ids`` fed one at a time."""
    out = [model(ids[:, :prompt], attention_mask=None if mask is None else mask[:, :prompt],
                 cache=cache).logits[:, -1]]
    for t in range(prompt, ids.shape[1]):
        m = None if mask is None else mask[:, :t + 1]
        out.append(model(ids[:, t:t + 1], attention_mask=m, cache=cache).logits[:, -1])
    return torch.stack(out)


# -- (a) nothing quantised: exactly Shared Attention alone ---------------------------------------------------------
@pytest.mark.parametrize("channel", ["kivi", "coupled"])
def test_unquantised_equals_shared_attention_alone(channel, make_model, make_ids, tmp_path):
    model = make_model("llama", layers=4)
    ids = make_ids(2, PROMPT + NEW)
    params = KIVI_OFF if channel == "kivi" else _coupled_params(model, tmp_path, residual=BIG)
    ref = _teacher_forced(model, _cache(model, [[1, 3]]), ids, PROMPT)
    cache = _cache(model, [[1, 3]], channel, params)
    out = _teacher_forced(model, cache, ids, PROMPT)
    assert torch.equal(out, ref)
    for i in (1, 2, 3):
        assert cache.layers[i].nq == 0 and cache.layers[i].physical_length == PROMPT + NEW
    assert type(cache.layers[1]).__mro__[1:3] == (SourceLayer, cache.channel.layer_class)
    assert isinstance(cache.layers[2], SharedLayer) and not cache.layers[2].stores_keys


# -- (b) quantised: a hand reference over explicitly dequantised keys/values ---------------------------------------
def _kivi_dequant(k: torch.Tensor, v: torch.Tensor, nq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``< nq`` of keys/values ``[B, H, n, D]`` replaced by KIVI's round trip: keys per channel over groups
    of 8 tokens (groups aligned at position 0), values per token over groups of 8 channels, 2 bits."""
    if nq == 0:
        return k, v
    b, h, _, d = k.shape
    g = KIVI_ON["group_size"]
    kc, ks, kz = quantize(k[:, :, :nq].reshape(b, h, nq // g, g, d), 2, dim=3, store_dtype=torch.float32)
    vc, vs, vz = quantize(v[:, :, :nq].reshape(b, h, nq, d // g, g), 2, dim=4, store_dtype=torch.float32)
    kq = (kc.float() * ks + kz).reshape(b, h, nq, d)
    vq = (vc.float() * vs + vz).reshape(b, h, nq, d)
    return torch.cat([kq, k[:, :, nq:]], 2), torch.cat([vq, v[:, :, nq:]], 2)


def _cq_dequant(books: dict, layer: int):
    def dequant(k: torch.Tensor, v: torch.Tensor, nq: int) -> tuple[torch.Tensor, torch.Tensor]:
        if nq == 0:
            return k, v
        out = []
        for t, book in ((k, books[layer][0]), (v, books[layer][1])):  # book: [H, D/c, K, c]
            b, h, _, d = t.shape
            ng, c = book.shape[1], book.shape[3]
            pts = t[:, :, :nq].reshape(b, h, nq, ng, c).permute(1, 3, 0, 2, 4).reshape(h * ng, b * nq, c)
            idx = cq.nearest(pts, book.reshape(h * ng, -1, c)).reshape(h, ng, b, nq)
            deq = torch.stack([torch.stack([book[hh, gg, idx[hh, gg]] for gg in range(ng)], 2) for hh in range(h)], 1)
            out.append(torch.cat([deq.reshape(b, h, nq, d), t[:, :, nq:]], 2))  # deq: [B, H, nq, ng, c]
        return out[0], out[1]

    return dequant


def _reference_attention(source: int, shared: set[int], quantised, dequant):
    """Shared Attention by hand over a full ``DynamicCache``: at each call the first ``quantised(n_before)`` positions
    of every layer's keys/values are replaced by their dequantised round trip (``dequant[layer]``); the source
    computes softmax(QK^T) (float64, causal, no padding) and the shared layers multiply their own values with it."""
    store = {}

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [B, Hq, q, D], key/value [B, Hkv, n, D]
        hq, q_len, n = query.shape[1], query.shape[2], key.shape[2]
        i = module.layer_idx
        key, value = dequant[i](key, value, quantised(n - q_len))
        rep = hq // key.shape[1]
        value = value.repeat_interleave(rep, dim=1).double()
        if i in shared:
            weights = store["w"]
        else:
            k = key.repeat_interleave(rep, dim=1).double()
            logits = (query.double() @ k.transpose(-1, -2)) * scaling
            q_pos = torch.arange(n - q_len, n)[:, None]
            logits = logits.masked_fill(torch.arange(n)[None, :] > q_pos, float("-inf"))
            weights = logits.softmax(-1)
            if i == source:
                store["w"] = weights
        out = (weights @ value).to(query.dtype)  # [B, Hq, q, D]
        return out.transpose(1, 2).contiguous(), None

    return attn


@pytest.mark.parametrize("channel", ["kivi", "coupled"])
def test_quantised_equals_hand_reference(channel, make_model, make_ids, tmp_path):
    model = make_model("llama", layers=4)
    ids = make_ids(2, PROMPT + NEW)
    if channel == "kivi":
        params = KIVI_ON
        r, g = KIVI_ON["residual"], KIVI_ON["group_size"]
        quantised = lambda n: max(0, (n - r) // g) * g  # noqa: E731 - flushed before this step, whole groups
        dequant = {i: _kivi_dequant for i in range(4)}
    else:
        params = _coupled_params(model, tmp_path, residual=0)
        quantised = lambda n: n  # noqa: E731 - residual 0: every earlier token is quantised
        books = {int(i): kv for i, kv in torch.load(params["calibration"], weights_only=True)["layers"].items()}
        dequant = {i: _cq_dequant(books, i) for i in range(4)}
    AttentionInterface.register("test_sa_channel_reference", _reference_attention(1, {2, 3}, quantised, dequant))
    model.set_attn_implementation("test_sa_channel_reference")
    ref = _teacher_forced(model, DynamicCache(config=model.config), ids, PROMPT)
    model.set_attn_implementation("sdpa")
    plain = _teacher_forced(model, _cache(model, [[1, 3]]), ids, PROMPT)
    squeezekv.detach(model)
    assert (ref - plain).abs().max() > 1e-3  # quantisation really changes the output (else the test could not fail)
    cache = _cache(model, [[1, 3]], channel, params)
    out = _teacher_forced(model, cache, ids, PROMPT)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    src = cache.layers[1]
    assert src.nq == quantised(PROMPT + NEW) > 0  # after the last step's flush
    for i in (2, 3):
        assert cache.layers[i].nq == src.nq and cache.layers[i].residual_length == src.residual_length
    squeezekv.detach(model)


def test_long_prompt_recomputes_quantised_weights_in_chunks(monkeypatch, make_model, make_ids):
    """A second prompt chunk after quantised tokens: the weights do not fit one chunk, so each shared layer recomputes
    them from the source's dequantised keys; the result equals the one-chunk path."""
    from squeezekv.crosslayer import shared_attention as sa

    model = make_model("llama", layers=4)
    ids = make_ids(1, 40)

    def run():
        cache = _cache(model, [[1, 3]], "kivi", KIVI_ON)
        model(ids[:, :24], cache=cache)
        assert cache.layers[1].nq == 16
        return model(ids[:, 24:], cache=cache).logits

    ref = run()
    monkeypatch.setattr(sa, "EAGER_BLOCK", 4 * 40)
    torch.testing.assert_close(run(), ref, atol=1e-5, rtol=0)


# -- (c) eviction ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("allocation", ["uniform", "squeeze"])
@pytest.mark.parametrize("method", ["h2o", "snapkv", "streamingllm"])
def test_eviction_keeps_the_sources_tokens_and_split(method, allocation, make_model, make_left_padded):
    """Every shared layer holds exactly its source's tokens (token_idx, padding flags, quantised/residual split) after
    prefill + 12 decoded tokens. Against other runs (teacher forcing, same plan): layers 0-1 (up to the first
    source) equal KIVI alone, whose inputs are the same; for snapkv and streamingllm every layer equals Shared
    Attention without a channel method (snapkv selects once, on the prompt, before anything is quantised;
    streamingllm by position). Under h2o the later layers may differ: their scores are weights over dequantised
    keys."""
    model = make_model("llama", layers=6)
    ids, mask = make_left_padded([40, 31], 40 + NEW)
    mask[:, 40:] = 1
    spans = [[1, 3], [4, 5]]
    kivi = {"bits": 2, "group_size": 4, "residual": 4}
    cache = _cache(model, spans, "kivi", kivi, method=method, budget=20, allocation=allocation)
    _teacher_forced(model, cache, ids, 40, mask)
    plan = cache.plan
    for src, span in ((1, (2, 3)), (4, (5,))):
        s = cache.layers[src]
        assert isinstance(s, SourceLayer) and isinstance(s, KIVILayer) and s.compressed and s.nq > 0
        for i in span:
            layer = cache.layers[i]
            assert isinstance(layer, SharedLayer) and isinstance(layer, KIVILayer)
            assert torch.equal(layer.token_idx, s.token_idx), (method, allocation, i)
            assert torch.equal(layer.valid, s.valid)
            assert (layer.nq, layer.residual_length) == (s.nq, s.residual_length)
            assert layer.kcode is None and layer.keys.numel() == 0
    alone = _cache(model, None, "kivi", kivi, method=method, plan=plan)
    _teacher_forced(model, alone, ids, 40, mask)
    for i in (0, 1):
        assert torch.equal(alone.layers[i].token_idx, cache.layers[i].token_idx), (method, allocation, i)
    if method != "h2o":
        sa_alone = _cache(model, spans, method=method, plan=plan)
        _teacher_forced(model, sa_alone, ids, 40, mask)
        for i in range(6):
            assert torch.equal(sa_alone.layers[i].token_idx, cache.layers[i].token_idx), (method, allocation, i)


@pytest.mark.parametrize("method", ["h2o", "snapkv"])
def test_chunked_prefill_keeps_the_sources_tokens_and_split(method, make_model, make_ids):
    """A prompt in chunks of 12 with eviction to 10 tokens after each chunk and quantisation of the survivors: the
    shared layers hold the source's tokens with the same split after every chunk, then decode on."""
    from squeezekv.prefill import chunked_prefill

    model = make_model("llama", layers=4)
    ids = make_ids(2, 41)
    cache = _cache(model, [[1, 3]], "kivi", {"bits": 2, "group_size": 2, "residual": 2}, method=method, budget=10)
    chunked_prefill(model, ids[:, :40], cache, chunk_size=12)
    model(ids[:, 40:], cache=cache)
    src = cache.layers[1]
    assert src.nq > 0 and src.physical_length == (10 if method == "h2o" else 11)
    for i in (2, 3):
        layer = cache.layers[i]
        assert torch.equal(layer.token_idx, src.token_idx)
        assert (layer.nq, layer.residual_length) == (src.nq, src.residual_length)


def _all_values(layer) -> torch.Tensor:
    return torch.cat([v for _, _, v in layer.value_blocks()], dim=2)  # [B, H, n, Dv]


@pytest.mark.parametrize("channel", ["kivi", "coupled"])
def test_heads_keeping_different_numbers_of_quantised_tokens(channel, make_model, make_ids, tmp_path):
    """H2O-like eviction where head 0 keeps old (quantised) tokens and head 1 new (residual) ones: the source moves
    head 1's extra quantised tokens back to its residual (dequantised) and its shared layers do exactly the same with
    their values (values unchanged by the move), keeping the same split; decoding then goes on."""
    model = make_model("llama", layers=4)
    ids = make_ids(1, 41)
    params = ({"bits": 2, "group_size": 4, "residual": 8} if channel == "kivi"
              else _coupled_params(model, tmp_path, residual=8))
    cache = _cache(model, [[1, 3]], channel, params, method="h2o", method_params={"recent_ratio": 0.1})
    model(ids[:, :40], cache=cache)
    src = cache.layers[1]
    assert src.nq == 32
    before = {i: _all_values(cache.layers[i]) for i in (1, 2, 3)}
    pos = torch.arange(40, dtype=torch.float32)
    src.scores = torch.stack([40 - pos, pos], dim=0)[None]  # head 0 favours old tokens, head 1 new ones
    src.compress(20)  # 2 most recent + 18 best scored per head: head 0 keeps 18 quantised, head 1 12
    for i in (2, 3):
        cache.layers[i].compress(20)
    assert src.token_idx[0].tolist() == [list(range(18)) + [38, 39], list(range(20, 40))]
    assert src.nq == 12 and src.residual_length == 8  # head 0's 6 extra quantised tokens moved to the residual
    idx = src.token_idx.long()[..., None].expand(-1, -1, -1, D)
    for i in (1, 2, 3):
        layer = cache.layers[i]
        assert torch.equal(layer.token_idx, src.token_idx)
        assert (layer.nq, layer.residual_length) == (src.nq, src.residual_length)
        torch.testing.assert_close(_all_values(layer), before[i].gather(2, idx), atol=1e-6, rtol=0)
    model(ids[:, 40:], cache=cache)
    assert all(cache.layers[i].physical_length == 21 for i in (1, 2, 3))
    assert all(torch.equal(cache.layers[i].token_idx, src.token_idx) for i in (2, 3))


# -- (d) bytes ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channel", ["kivi", "coupled"])
def test_bytes_follow_the_formula(channel, make_model, make_ids, tmp_path):
    """After a 40-token prompt (no eviction, batch 2, 2 KV heads, float32): the source stores the channel method's
    key+value storage, a shared layer the same values storage and nothing for keys."""
    model = make_model("llama", layers=4)
    b, h, n = 2, 2, 40
    params = KIVI_ON if channel == "kivi" else _coupled_params(model, tmp_path, residual=3)
    cache = _cache(model, [[1, 3]], channel, params)
    model(make_ids(b, n), cache=cache)
    if channel == "kivi":
        nq, r, g = 32, 8, 8  # (40 - 8) // 8 whole groups
        values = b * h * (nq * (D * 2 // 8 + 2 * (D // g) * 4) + r * D * 4)  # codes + scale/zero per token; residual
        keys = b * h * (nq * D * 2 // 8 + 2 * (nq // g) * D * 4 + r * D * 4)  # codes + scale/zero per group; residual
    else:
        nq, r = 37, 3
        values = b * h * (nq * D // 8 + r * D * 4)  # 4-bit code per group of 4 channels; residual
        keys = values
    idx = b * h * n * 4  # int32 token indices
    src, shared = cache.layers[1], cache.layers[2]
    assert (src.nq, shared.nq) == (nq, nq)
    assert src.nbytes() == keys + values + idx and src.kv_nbytes() == keys + values
    for i in (2, 3):
        assert cache.layers[i].nbytes() == values + idx and cache.layers[i].kv_nbytes() == values
    assert cache.layers[0].nbytes() == src.nbytes()  # a plain quantised layer
    assert cache.kv_nbytes() == 2 * (keys + values) + 2 * values


# -- (e) refusals ---------------------------------------------------------------------------------------------------
def test_eigen_is_refused_with_the_reason(make_model):
    with pytest.raises(ValueError, match="eigen does not compose with shared_attention.*low-rank"):
        _cache(make_model("llama"), [[1, 3]], "eigen", {"calibration": "unused.pt"})


def test_lckv_cache_refuses_a_channel_method():
    from squeezekv.crosslayer.lckv import LCKVCache, LCKVConfig, make_kv_sources

    config = LCKVConfig(kv_sources=make_kv_sources(4, "top", 1), num_hidden_layers=4, vocab_size=128, hidden_size=64,
                        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="LCKV.*kivi.*reads the full-precision"):
        LCKVCache(config, channel="kivi")


@pytest.mark.real_weights
def test_default_model_sharing_with_kivi():
    """SmolLM2: span [23, 26] with KIVI; residual longer than the sequence = Shared Attention alone exactly; 2-bit with
    H2O keeps the span on the source's tokens and split, shared layers without key storage."""
    import os

    from squeezekv import assets

    try:
        assets.fetch(assets.SMOLLM2, allow_download=os.environ.get("SQUEEZEKV_OFFLINE") != "1")
        model, _ = assets.load_model(None)
    except (FileNotFoundError, OSError) as err:
        pytest.skip(f"default model not available offline: {err}")
    ids = torch.randint(1000, 20000, (1, 72), generator=torch.Generator().manual_seed(0))
    ref = _teacher_forced(model, _cache(model, [[23, 26]]), ids, 64)
    out = _teacher_forced(model, _cache(model, [[23, 26]], "kivi", {"bits": 2, "residual": 128}), ids, 64)
    assert torch.equal(out, ref)
    cache = _cache(model, [[23, 26]], "kivi", {"bits": 2, "group_size": 32, "residual": 8}, method="h2o", budget=48)
    _teacher_forced(model, cache, ids, 64)
    src = cache.layers[23]
    assert src.nq > 0 and src.physical_length <= 49
    for i in (24, 25, 26):
        layer = cache.layers[i]
        assert torch.equal(layer.token_idx, src.token_idx) and layer.kcode is None and layer.keys.numel() == 0
        assert (layer.nq, layer.residual_length) == (src.nq, src.residual_length)
    squeezekv.detach(model)
