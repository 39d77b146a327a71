"""Eigen Attention (channel method ``eigen``): calibration, rank selection, exactness at full rank and on keys/values
that lie in a low-rank span, bytes, composition with eviction, and clear errors for bad calibration files."""

from __future__ import annotations

import pytest
import torch

import squeezekv
from squeezekv.channel.eigen import (
    EigenAttention,
    apply_rope,
    load_calibration,
    select_rank,
    unapply_rope,
)
from squeezekv.channel.eigen_calibrate import calibrate, calibration_sequences, rank_report, save

PROMPT = 24
NEW = 8
BIG = 4096
MODES = ["pre", "post"]


def _calibrate(model, path, n_seq: int = 4, length: int = 48):
    g = torch.Generator().manual_seed(99)
    seqs = [torch.randint(3, model.config.vocab_size, (length,), generator=g).tolist() for _ in range(n_seq)]
    save(calibrate(model, seqs), path)
    return path


def _eigen(path, **params):
    return {"channel": "eigen", "channel_params": {"calibration": str(path), **params}}


# -- rank selection ---------------------------------------------------------------------------------------------


def test_select_rank_on_a_known_spectrum():
    lam = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative energy 0.4, 0.7, 0.9, 1.0
    expected = {0.1: 1, 0.4: 1, 0.41: 2, 0.7: 2, 0.71: 3, 0.9: 3, 0.95: 4, 0.999: 4, 1.0: 4}
    for thr, r in expected.items():
        assert int(select_rank(lam, thr)) == r, thr
    # batched rows, unsorted magnitudes irrelevant once sorted; a rank-2 spectrum reaches 1.0 at r = 2
    rows = torch.tensor([[4.0, 3.0, 2.0, 1.0], [5.0, 5.0, 0.0, 0.0]])
    assert select_rank(rows, 0.999999).tolist() == [4, 2]
    assert select_rank(rows, 1.0).tolist() == [4, 4]  # threshold 1: always the full dimension


def test_rank_report_matches_select_rank(make_model, tmp_path):
    model = make_model("llama")
    state = calibrate(model, [[5, 6, 7, 8, 9, 10, 11, 12] * 4])
    rep = rank_report(state, 0.9)
    assert rep["ranks"]["value"] == [int(r) for r in select_rank(state["value"]["eigenvalues"], 0.9).amax(-1)]
    h = state["model"]["num_kv_heads"]
    assert rep["elements_per_token_pre"] == h * sum(a + b for a, b in zip(rep["ranks"]["key_pre"],
                                                                         rep["ranks"]["value"]))
    assert rep["full_elements_per_token"] == 2 * 16 * h * 4


# -- RoPE -------------------------------------------------------------------------------------------------------


def test_unapply_rope_inverts_the_models_rope(make_model):
    model = make_model("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 64})
    from squeezekv.channel.eigen import RotaryTable

    table = RotaryTable(model)
    pos = torch.arange(0, 200, 7)[None]
    cos, sin = table.cos_sin(pos, 0)
    assert not torch.allclose(cos * cos + sin * sin, torch.ones_like(cos))  # yarn scales cos/sin
    x = torch.randn(1, 2, pos.shape[1], 16)
    y = apply_rope(x, cos[:, None], sin[:, None])
    torch.testing.assert_close(unapply_rope(y, cos[:, None], sin[:, None]), x, atol=1e-5, rtol=0)
    # same rotation as transformers' own
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)


# -- exactness --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope", MODES)
@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "leftpad3"])
def test_full_rank_reproduces_the_full_cache(rope, padded, make_model, make_ids, make_left_padded, run_greedy,
                                             same_generation, tmp_path):
    """threshold 1 keeps r = head_dim: an orthonormal change of basis, so the logits are the stock model's."""
    model = make_model("llama")
    path = _calibrate(model, tmp_path / "c.pt")
    ids, mask = make_left_padded([PROMPT, 17, 9], PROMPT) if padded else (make_ids(1, PROMPT), None)
    ref = run_greedy(model, ids, mask, new_tokens=NEW)
    cache = squeezekv.make_cache(model, "h2o", BIG, "uniform", **_eigen(path, threshold=1.0, rope=rope))
    same_generation(ref, run_greedy(model, ids, mask, cache=cache, new_tokens=NEW), atol=1e-4)
    assert cache.channel.ranks() == {"key": [16] * 4, "value": [16] * 4}


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text", "phi3", "mistral"])
def test_full_rank_other_architectures(arch, make_model, make_left_padded, run_greedy, same_generation, tmp_path):
    model = make_model(arch, partial_rotary_factor=0.5) if arch == "phi3" else make_model(arch)
    path = _calibrate(model, tmp_path / "c.pt")
    ids, mask = make_left_padded([PROMPT, 15], PROMPT)
    ref = run_greedy(model, ids, mask, new_tokens=NEW)
    cache = squeezekv.make_cache(model, "snapkv", BIG, "uniform", method_params={"window": 8},
                                 **_eigen(path, threshold=1.0))
    same_generation(ref, run_greedy(model, ids, mask, cache=cache, new_tokens=NEW), atol=1e-4)


def _low_rank_model(make_model, r0: int):
    """A llama whose pre-RoPE keys and values of every KV head lie in an r0-dimensional subspace."""
    model = make_model("llama", initializer_range=0.1)
    d = model.config.head_dim
    g = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight.data.view(-1, d, proj.weight.shape[1])  # [H, D, hidden]
            for h in range(w.shape[0]):
                basis, _ = torch.linalg.qr(torch.randn(d, r0, generator=g))  # [D, r0]
                w[h] = basis @ (basis.T @ w[h])  # project the rows' outputs on span(basis)
    return model


@pytest.mark.parametrize("policy", ["window", "h2o"])
def test_keys_and_values_in_a_low_rank_span_are_stored_exactly(policy, make_model, make_left_padded, run_greedy,
                                                               same_generation, tmp_path):
    """Pre-RoPE keys and values of rank r0 = 5: calibration finds r = 5 (< head_dim 16), the cache stores 5 channels
    per head and still reproduces the full model (the projection is exact on the span). The 'post' basis (rotated
    keys and queries) needs a larger rank for the same energy."""
    r0 = 5
    model = _low_rank_model(make_model, r0)
    path = _calibrate(model, tmp_path / "c.pt", n_seq=4, length=64)
    state = load_calibration(path, model)
    assert select_rank(state["key_pre"]["eigenvalues"], 0.99999).max() == r0
    assert select_rank(state["value"]["eigenvalues"], 0.99999).max() == r0
    assert select_rank(state["key_post"]["eigenvalues"], 0.99999).min() > r0
    ids, mask = make_left_padded([PROMPT, 19], PROMPT, seed=4)
    ref = run_greedy(model, ids, mask, new_tokens=NEW)
    cache = squeezekv.make_cache(model, policy, BIG, "uniform", **_eigen(path, threshold=0.99999, rope="pre"))
    out = run_greedy(model, ids, mask, cache=cache, new_tokens=NEW)
    same_generation(ref, out, atol=1e-4)
    assert cache.channel.ranks() == {"key": [r0] * 4, "value": [r0] * 4}
    assert all(cache.layers[i].keys.shape[-1] == r0 and cache.layers[i].values.shape[-1] == r0 for i in range(4))


def test_lower_rank_changes_the_output(make_model, make_ids, tmp_path):
    """A threshold below 1 on a full-rank model really drops channels: logits move, less so for a higher rank."""
    model = make_model("llama")
    path = _calibrate(model, tmp_path / "c.pt")
    ids = make_ids(1, PROMPT)
    ref = model(ids).logits
    err = {}
    for r in (4, 12):
        cache = squeezekv.make_cache(model, "window", BIG, "uniform", **_eigen(path, rank=r))
        err[r] = float((model(ids, cache=cache).logits - ref).abs().max())
        assert cache.layers[0].keys.shape[-1] == r
    assert err[4] > err[12] > 1e-4


# -- bytes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy,budget", [("window", BIG), ("h2o", 10)])
@pytest.mark.parametrize("rope", MODES)
def test_bytes_per_token_equal_the_formula(policy, budget, rope, make_model, make_ids, tmp_path):
    model = make_model("llama")
    path = _calibrate(model, tmp_path / "c.pt")
    cache = squeezekv.make_cache(model, policy, budget, "uniform", **_eigen(path, threshold=0.8, rope=rope))
    b = 2
    model(make_ids(b, PROMPT), cache=cache)
    ranks = cache.channel.ranks()
    assert max(ranks["key"]) < 16 and max(ranks["value"]) < 16
    n = min(budget, PROMPT)
    h, elem = 2, 4  # KV heads, float32
    scores = 4 if policy == "h2o" else 0
    for i in cache.managed:
        layer = cache.layers[i]
        assert layer.physical_length == n
        kv = b * h * n * (ranks["key"][i] + ranks["value"][i]) * elem
        assert layer.kv_nbytes() == kv
        offset = 8 * b if rope == "pre" else 0  # rope="pre": one int64 position offset per row
        assert layer.nbytes() == kv + b * h * n * (4 + scores) + offset  # + token_idx (int32), scores (float32)
    assert cache.channel.kv_elements_per_token() == h * sum(k + v for k, v in zip(ranks["key"], ranks["value"]))
    assert cache.channel.basis_nbytes() == 4 * 16 * h * sum(k + v for k, v in zip(ranks["key"], ranks["value"]))


# -- composition with eviction ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rope", MODES)
@pytest.mark.parametrize("policy,allocation", [(p, "uniform") for p in squeezekv.policy_names()]
                         + [("h2o", "squeeze"), ("window", "pyramid")])
def test_eviction_keeps_the_same_tokens_as_without_eigen(policy, allocation, rope, make_model, make_left_padded,
                                                         tmp_path, method_params):
    """At full rank the policy sees the same attention, so it keeps exactly the tokens it keeps alone."""
    model = make_model("llama")
    path = _calibrate(model, tmp_path / "c.pt")
    ids, mask = make_left_padded([PROMPT, 20], PROMPT, seed=6)
    params = method_params(policy)
    runs = {}
    for name, extra in (("plain", {}), ("eigen", _eigen(path, threshold=1.0, rope=rope))):
        cache = squeezekv.make_cache(model, policy, 12, allocation, method_params=params, **extra)
        out = model(ids, attention_mask=mask, cache=cache)
        logits = [out.logits[:, -1]]
        m = mask
        for _ in range(4):
            nxt = logits[-1].argmax(-1, keepdim=True)
            m = torch.cat([m, torch.ones_like(nxt)], dim=1)
            logits.append(model(nxt, attention_mask=m, cache=cache).logits[:, -1])
        runs[name] = (cache, torch.stack(logits))
    plain, eig = runs["plain"][0], runs["eigen"][0]
    assert plain.plan.budgets == eig.plan.budgets
    for i in plain.managed:
        assert torch.equal(plain.layers[i].token_idx, eig.layers[i].token_idx), i
        if plain.policy.evicts:
            assert plain.layers[i].physical_length < PROMPT  # really evicted
    torch.testing.assert_close(runs["eigen"][1], runs["plain"][1], atol=1e-4, rtol=0)


def test_eviction_on_top_of_low_rank_frees_memory(make_model, make_ids, tmp_path):
    model = make_model("llama")
    path = _calibrate(model, tmp_path / "c.pt")
    ids = make_ids(1, PROMPT)
    sizes = {}
    for budget in (BIG, 8):
        cache = squeezekv.make_cache(model, "streamingllm", budget, "uniform", **_eigen(path, rank=6))
        model(ids, cache=cache)
        sizes[budget] = cache.kv_nbytes()
    assert sizes[BIG] == 4 * 2 * PROMPT * 12 * 4  # layers x heads x tokens x (6 + 6) x float32
    assert sizes[8] == 4 * 2 * 8 * 12 * 4


# -- errors -----------------------------------------------------------------------------------------------------


def test_bad_calibration_files_raise_value_errors(make_model, tmp_path):
    model = make_model("llama")
    good = _calibrate(model, tmp_path / "good.pt")
    with pytest.raises(ValueError, match="needs calibration"):
        squeezekv.make_cache(model, "window", 8, channel="eigen")
    with pytest.raises(ValueError, match="does not exist"):
        squeezekv.make_cache(model, "window", 8, **_eigen(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable"):
        squeezekv.make_cache(model, "window", 8, **_eigen(garbage))
    state = torch.load(good, weights_only=True)
    wrong = tmp_path / "wrong.pt"
    torch.save({**state, "format": "other"}, wrong)
    with pytest.raises(ValueError, match="format"):
        squeezekv.make_cache(model, "window", 8, **_eigen(wrong))
    bad_basis = {**state, "value": {"basis": state["value"]["basis"] * 2, "eigenvalues": state["value"]["eigenvalues"]}}
    torch.save(bad_basis, wrong)
    with pytest.raises(ValueError, match="orthonormal"):
        squeezekv.make_cache(model, "window", 8, **_eigen(wrong))
    truncated = {**state, "key_pre": {"basis": state["key_pre"]["basis"][:2],
                                      "eigenvalues": state["key_pre"]["eigenvalues"]}}
    torch.save(truncated, wrong)
    with pytest.raises(ValueError, match="shape"):
        squeezekv.make_cache(model, "window", 8, **_eigen(wrong))
    other = make_model("llama", layers=2)  # calibration for 4 layers used with a 2-layer model
    with pytest.raises(ValueError, match="calibrated for a model"):
        squeezekv.make_cache(other, "window", 8, **_eigen(good))
    with pytest.raises(ValueError, match="head_dim"):
        squeezekv.make_cache(model, "window", 8, **_eigen(good, rank=17))


@pytest.mark.parametrize("params,match", [
    ({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"), ({"rank": 0}, "rank"),
    ({"rope": "sideways"}, "rope"), ({"nope": 1}, "no parameter"),
])
def test_bad_parameters(params, match):
    from squeezekv.registry import make_channel

    with pytest.raises(ValueError, match=match):
        make_channel("eigen", **params)


def test_cache_without_prepare_raises(make_model, make_ids):
    model = make_model("llama")
    squeezekv.attach(model)
    cache = squeezekv.build_cache(model.config, "window", budget=8, channel="eigen",
                                  channel_params={"calibration": "x"})
    with pytest.raises(ValueError, match="not prepared"):
        model(make_ids(1, 8), cache=cache)


def test_registered_and_described():
    from squeezekv.registry import CHANNELS, channel_names

    assert "eigen" in channel_names() and CHANNELS["eigen"] is EigenAttention
    assert "2408.05646" in EigenAttention.paper


def test_calibration_sequences_cover_the_budget():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    texts = [(f"t{i}", chr(65 + i) * 300) for i in range(10)]
    seqs = calibration_sequences(Tok(), texts, tokens=250, seq_len=100)
    assert [len(s) for s in seqs] == [100, 100, 50]
    assert len({s[0] for s in seqs}) == 3  # three different texts, spread over the collection
    one = calibration_sequences(Tok(), [("one", "x" * 1000)], tokens=350, seq_len=100)
    assert [len(s) for s in one] == [100, 100, 100, 50]


def test_cli_calibrate_eigen_reports_user_errors(tmp_path, capsys):
    from squeezekv.cli import main

    assert main(["calibrate-eigen", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "c.pt"),
                 "--threshold", "2"]) == 2
    assert "threshold" in capsys.readouterr().err


# -- real weights -----------------------------------------------------------------------------------------------


@pytest.mark.real_weights
def test_default_model_full_rank_and_calibration_text(tmp_path):
    """SmolLM2: calibration on kernel documentation pages the evaluation never reads; threshold 1 reproduces the
    full model's logits; a threshold of 0.95 keeps fewer than head_dim channels somewhere."""
    import os

    from squeezekv import assets
    from squeezekv.channel.eigen_calibrate import EVAL_MIN_CHARS, calibration_texts

    try:
        assets.fetch(assets.SMOLLM2, allow_download=os.environ.get("SQUEEZEKV_OFFLINE") != "1")
        texts = calibration_texts()
    except (FileNotFoundError, OSError) as err:
        pytest.skip(f"default model or kernel documentation not available offline: {err}")
    assert texts and all(len(t) < EVAL_MIN_CHARS for _, t in texts)
    model, tokenizer = assets.load_model("default")
    seqs = calibration_sequences(tokenizer, texts, tokens=256, seq_len=128)
    save(calibrate(model, seqs), tmp_path / "c.pt")
    ids = torch.tensor([seqs[0][:48]])
    ref = model(ids).logits
    cache = squeezekv.make_cache(model, "none", 1.0, **_eigen(tmp_path / "c.pt", threshold=1.0))
    torch.testing.assert_close(model(ids, cache=cache).logits, ref, atol=2e-3, rtol=0)
    cache = squeezekv.make_cache(model, "none", 1.0, **_eigen(tmp_path / "c.pt", threshold=0.95))
    model(ids, cache=cache)
    assert min(cache.channel.ranks()["key"]) < 64 and cache.kv_nbytes() < 30 * 3 * 2 * 64 * 4 * 48
