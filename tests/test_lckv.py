"""LCKV (Wu & Tu, ACL 2024, arXiv 2405.10637): parallel = sequential, cached decoding = full forward, condensed cache
bytes, standard layout = Llama, Auto-class registration and conversion from Llama. Tiny float32 models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DummyLayer

from squeezekv.crosslayer.lckv import (
    LCKVConfig,
    LCKVForCausalLM,
    expected_nbytes,
    from_llama,
    make_kv_sources,
)

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _strong_weights(model):
    """Matrices drawn with std 0.15 instead of the 0.02 default, so that the layers really interact."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


def lckv(layout: str = "top", layers: int = 4, warmup: int = 1, m: int = 7, b: int = 2, seed: int = 0):
    config = LCKVConfig(kv_sources=make_kv_sources(layers, layout, warmup), forward_passes=m, backward_passes=b,
                        num_hidden_layers=layers, **COMMON)
    torch.manual_seed(seed)
    return _strong_weights(LCKVForCausalLM(config))


def random_llama(layers: int = 3):
    torch.manual_seed(0)
    return _strong_weights(LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **COMMON)))


def ids(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def token_by_token(model, tokens: torch.Tensor) -> torch.Tensor:
    """Sequential computation: one token at a time through a cache -> logits [B, n, vocab]."""
    cache = model.make_cache()
    out = [model(tokens[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(tokens.shape[1])]
    return torch.cat(out, 1)


def test_layouts():
    assert make_kv_sources(8, "standard") == list(range(8))
    assert make_kv_sources(8, "top", 2) == [0, 1, 7, 7, 7, 7, 7, 7]
    assert make_kv_sources(8, "sandwich", 2) == [0, 6, 6, 6, 6, 6, 6, 7]  # reference's "0_6_6_6_6_6_6_7"
    with pytest.raises(ValueError, match="layer 3 attends to layer 1"):
        LCKVConfig(kv_sources=[0, 1, 3, 1], num_hidden_layers=4, **COMMON)
    with pytest.raises(ValueError, match="kv_sources\\[2\\] = 9"):
        LCKVConfig(kv_sources=[0, 1, 9, 3], num_hidden_layers=4, **COMMON)
    with pytest.raises(ValueError, match="'diagonal'"):
        make_kv_sources(4, "diagonal")


@pytest.mark.parametrize("layout", ["top", "sandwich"])
def test_parallel_with_enough_iterations_equals_sequential(layout):
    n = 10
    model = lckv(layout, m=n - 2, b=2)  # m + b >= n: the paper's convergence argument
    x = ids(2, n)
    assert model.model.iteration_plan(n) == (n - 2, 2)
    parallel = model(x).logits
    sequential = token_by_token(model, x)
    torch.testing.assert_close(parallel, sequential, atol=1e-5, rtol=0)
    # the test can fail: too few iterations leave later tokens wrong, while the first tokens are already exact
    model.config.forward_passes, model.config.backward_passes = 1, 1
    few = model(x).logits
    torch.testing.assert_close(few[:, :2], sequential[:, :2], atol=1e-5, rtol=0)
    assert (few[:, 2:] - sequential[:, 2:]).abs().max() > 1e-2


def test_first_token_sees_no_top_kv():
    """Below its source, token 0 attends to nothing (output 0) and token i to the source KV of tokens < i: the hidden
    state of token 0 entering the top layer does not depend on the top layer's values; token 1's does."""
    model = lckv("top", layers=3, warmup=1)
    x = ids(1, 6)
    seen: list[torch.Tensor] = []
    model.model.layers[2].input_layernorm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    model(x)
    before = seen[-1].clone()  # [1, 6, hidden] entering layer 2, last iteration
    with torch.no_grad():
        model.model.layers[2].self_attn.v_proj.weight.mul_(3.0)  # changes every top-layer value
    model(x)
    torch.testing.assert_close(seen[-1][:, 0], before[:, 0], atol=0, rtol=0)
    assert (seen[-1][:, 1] - before[:, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["top", "sandwich", "standard"])
def test_cached_decoding_equals_full_forward(layout):
    prompt, new = 6, 5
    model = lckv(layout, m=prompt + new, b=1)  # the full forward of prompt+new tokens is exact
    x = ids(2, prompt + new, seed=3)
    full = model(x).logits
    cache = model.make_cache()
    # the prompt is encoded in parallel (exact: m + b >= prompt), then tokens are decoded one by one
    steps = [model(x[:, :prompt], cache=cache, use_cache=True).logits]
    for i in range(prompt, prompt + new):
        steps.append(model(x[:, i : i + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == prompt + new
    # a prompt encoded in two blocks (the second one attends to the cached first one) equals it too
    cache = model.make_cache()
    blocks = [model(x[:, :4], cache=cache, use_cache=True).logits, model(x[:, 4:], cache=cache, use_cache=True).logits]
    torch.testing.assert_close(torch.cat(blocks, 1), full, atol=1e-5, rtol=0)


def test_generate_uses_condensed_cache_and_matches_manual_greedy():
    model = lckv("top", m=16, b=1)
    x = ids(1, 5, seed=4)
    out = model.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    seq = x
    for _ in range(6):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out.sequences, seq)
    layers = out.past_key_values.layers
    assert [isinstance(layer, DummyLayer) for layer in layers] == [False, True, True, False]


@pytest.mark.parametrize("layout,kv_layers", [("top", [0, 5]), ("sandwich", [0, 4, 5]), ("standard", list(range(6)))])
def test_cache_bytes_only_kv_layers_allocate(layout, kv_layers):
    model = lckv(layout, layers=6, warmup=1 if layout == "top" else 2)
    cache = model.make_cache()
    model(ids(3, 7), cache=cache, use_cache=True)
    model(ids(3, 1), cache=cache, use_cache=True)
    assert model.config.kv_layers == kv_layers
    held = [l for l, layer in enumerate(cache.layers) if layer.keys is not None]
    assert held == kv_layers
    # 2 (K,V) x batch 3 x 2 KV heads x 8 tokens x head_dim 16 x 4 bytes per KV layer
    per_layer = 2 * 3 * 2 * 8 * 16 * 4
    assert cache.nbytes() == len(kv_layers) * per_layer == expected_nbytes(model.config, 3, 8, torch.float32)


def test_standard_layout_equals_llama():
    llama = random_llama(3)
    model = from_llama(llama, kv_sources=make_kv_sources(3, "standard"))
    x = ids(2, 9)
    torch.testing.assert_close(model(x).logits, llama(x).logits, atol=1e-5, rtol=0)
    # with padding (left), real tokens equal too
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    a = model(x, attention_mask=mask, position_ids=pos).logits
    b = llama(x, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=0)
    # an LCKV layout drops the unused projections and keeps every other weight
    top = from_llama(llama, kv_sources=make_kv_sources(3, "top", 1))
    assert not hasattr(top.model.layers[1].self_attn, "k_proj")
    assert torch.equal(top.model.layers[1].self_attn.q_proj.weight, llama.model.layers[1].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="model_type 'squeezekv_lckv'"):
        from_llama(top, kv_sources=[0, 1, 2])


def test_auto_classes_and_save_load(tmp_path):
    model = lckv("sandwich", layers=4, warmup=2)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is LCKVConfig and config.kv_sources == [0, 2, 2, 3]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LCKVForCausalLM
    x = ids(1, 5)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_training_gradients_flow_through_b_iterations():
    model = lckv("top", m=2, b=2).train()
    x = ids(2, 8)
    with torch.enable_grad():
        loss = model(x, labels=x).loss
        loss.backward()
    assert torch.isfinite(loss)
    # the top layer's KV projection receives gradient through the lower layers' attention
    assert model.model.layers[3].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_left_padding_equals_unpadded_rows():
    model = lckv("top", m=12, b=1)
    x = ids(2, 8, seed=5)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    x[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = model(x, attention_mask=mask, position_ids=pos).logits
    alone = model(x[:1, 3:]).logits
    torch.testing.assert_close(padded[:1, 3:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[1:], model(x[1:]).logits, atol=1e-5, rtol=0)


def test_bf16_autocast_training_step():
    model = lckv("sandwich", m=2, b=2).train()
    x = ids(2, 8)
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
    with torch.enable_grad():
        loss.backward()
    assert torch.isfinite(loss) and model.model.layers[3].self_attn.k_proj.weight.grad.abs().sum() > 0


@pytest.mark.real_weights
def test_standard_layout_equals_the_default_model():
    import os

    from squeezekv import assets

    try:
        assets.fetch(assets.SMOLLM2, allow_download=os.environ.get("SQUEEZEKV_OFFLINE") != "1")
        path = assets.default_model_dir(progress=False)
    except (FileNotFoundError, OSError) as err:
        pytest.skip(f"default model not available offline: {err}")
    llama = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = ids(1, 12) + 200
    model = from_llama(llama, make_kv_sources(llama.config.num_hidden_layers, "standard"))
    torch.testing.assert_close(model(x).logits, llama(x).logits, atol=1e-4, rtol=0)
    lckv_model = from_llama(llama, make_kv_sources(llama.config.num_hidden_layers, "sandwich", 2))
    assert lckv_model.config.kv_layers == [0, 28, 29]
    cache = lckv_model.make_cache()
    lckv_model(x, cache=cache, use_cache=True)
    assert cache.nbytes() == 3 * 2 * 3 * 12 * 64 * 4  # 3 KV layers x (K,V) x 3 KV heads x 12 tokens x 64 x fp32


def test_a_cache_handed_in_is_filled_even_when_the_config_says_no_cache():
    model = lckv("top")
    model.config.use_cache = False
    cache = model.make_cache()
    model(ids(1, 5), cache=cache)
    assert cache.get_seq_length() == 5
    assert model(ids(1, 5)).cache is None


def test_budgeted_condensed_cache_equals_squeezekv_on_the_same_llama():
    """Composition: LCKV's cache budgeted by the registry's streamingllm policy. For the standard layout the model is a
    Llama, so squeezekv's own SqueezeCache with the same policy and budget is an independent reference."""
    import squeezekv
    from squeezekv.crosslayer.lckv import BudgetedLCKVCache

    llama = random_llama(3)
    model = from_llama(llama, make_kv_sources(3, "standard"))
    x = ids(1, 10, seed=8)
    ref_cache = squeezekv.make_cache(llama, method="streamingllm", budget=6, allocation="uniform",
                                     method_params={"sinks": 2}, attn_backend="eager")
    cache = BudgetedLCKVCache(model.config, "streamingllm", 6, sinks=2)
    ref = [llama(x, cache=ref_cache).logits[:, -1]]
    out = [model(x, cache=cache).logits[:, -1]]
    tok_ref = tok = ref[-1].argmax(-1, keepdim=True)
    for _ in range(5):
        ref.append(llama(tok_ref, cache=ref_cache).logits[:, -1])
        out.append(model(tok, cache=cache).logits[:, -1])
        tok_ref, tok = ref[-1].argmax(-1, keepdim=True), out[-1].argmax(-1, keepdim=True)
    squeezekv.detach(llama)
    torch.testing.assert_close(torch.stack(out), torch.stack(ref), atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 15 and cache.physical_length() == 6
    assert cache.token_idx[0][0, 0].tolist() == [0, 1, 11, 12, 13, 14]  # 2 sinks + the 4 newest
    assert cache.nbytes() == expected_nbytes(model.config, 1, 6, torch.float32)
    with pytest.raises(ValueError, match="block of 2 tokens"):
        model(ids(1, 2), cache=cache)


def test_budgeted_lckv_cache_holds_budget_in_kv_layers_only():
    from squeezekv.crosslayer.lckv import BudgetedLCKVCache

    model = lckv("top", layers=4, warmup=1)
    cache = BudgetedLCKVCache(model.config, "window", 5)
    model(ids(2, 9), cache=cache)
    for t in ids(2, 3, seed=9).split(1, dim=1):
        model(t, cache=cache)
    assert [layer.keys.shape[-2] if layer.keys is not None else 0 for layer in cache.layers] == [5, 0, 0, 5]
    assert cache.token_idx[3][1, 0].tolist() == [7, 8, 9, 10, 11]
    assert cache.nbytes() == expected_nbytes(model.config, 2, 5, torch.float32)
    with pytest.raises(ValueError, match="'h2o' needs attention scores"):
        BudgetedLCKVCache(model.config, "h2o", 5)
    with pytest.raises(ValueError, match="budget=0"):
        BudgetedLCKVCache(model.config, "window", 0)
