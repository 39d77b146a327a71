"""Bad input fails early with a ValueError that names the bad value."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import squeezekv
from squeezekv import Budget, BudgetPlan

POLICIES = squeezekv.policy_names()
ALLOCATIONS = squeezekv.allocation_names()


@pytest.mark.parametrize("budget,shown", [(0, "0"), (-1, "-1"), (1.5, "1.5"), (0.0, "0"), (-0.25, "-0.25"),
                                          (float("nan"), "nan"), ("abc", "abc"), ("-3", "-3")])
def test_bad_budget(budget, shown, make_model):
    model = make_model("llama", layers=2)
    with pytest.raises(ValueError, match=re.escape(shown)):
        squeezekv.make_cache(model, "window", budget)
    with pytest.raises(ValueError, match=re.escape(shown)):
        Budget.parse(budget)


@pytest.mark.parametrize("budget", [True, None, [4]])
def test_budget_of_wrong_type(budget):
    with pytest.raises(TypeError):
        Budget.parse(budget)


def test_unknown_method_names_it_and_the_choices(make_model):
    with pytest.raises(ValueError, match="'nosuchmethod'") as err:
        squeezekv.make_cache(make_model("llama", layers=2), "nosuchmethod", 8)
    for name in POLICIES:
        assert name in str(err.value)


def test_unknown_allocation_names_it_and_the_choices(make_model):
    with pytest.raises(ValueError, match="'nosuchalloc'") as err:
        squeezekv.make_cache(make_model("llama", layers=2), "window", 8, "nosuchalloc")
    for name in ALLOCATIONS:
        assert name in str(err.value)


@pytest.mark.parametrize("method", POLICIES)
def test_unknown_method_parameter(method, make_model):
    with pytest.raises(ValueError, match="'bogus_param'"):
        squeezekv.make_cache(make_model("llama", layers=2), method, 8, method_params={"bogus_param": 1})


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_unknown_allocation_parameter(allocation, make_model):
    with pytest.raises(ValueError, match="'bogus_param'"):
        squeezekv.make_cache(make_model("llama", layers=2), "window", 8, allocation,
                             allocation_params={"bogus_param": 1})


@pytest.mark.parametrize(
    "method,params,shown",
    [("h2o", {"recent_ratio": 1.0}, "recent_ratio=1.0"), ("h2o", {"recent_ratio": -0.1}, "recent_ratio=-0.1"),
     ("snapkv", {"window": 0}, "window=0"), ("snapkv", {"kernel_size": 4}, "kernel_size=4"),
     ("streamingllm", {"sinks": -1}, "sinks=-1")],
)
def test_out_of_range_method_parameter(method, params, shown, make_model):
    with pytest.raises(ValueError, match=re.escape(shown)):
        squeezekv.make_cache(make_model("llama", layers=2), method, 8, method_params=params)


@pytest.mark.parametrize(
    "allocation,params,shown",
    [("pyramid", {"beta": 0.5}, "beta=0.5"), ("squeeze", {"p": 0.0}, "p=0.0"), ("squeeze", {"p": 1.5}, "p=1.5"),
     ("squeeze", {"clusters": 1}, "clusters=1")],
)
def test_out_of_range_allocation_parameter(allocation, params, shown, make_model):
    with pytest.raises(ValueError, match=re.escape(shown)):
        squeezekv.make_cache(make_model("llama", layers=2), "window", 8, allocation, allocation_params=params)


@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_bad_evict_every(value, make_model):
    with pytest.raises(ValueError, match=re.escape(f"evict_every={value}")):
        squeezekv.make_cache(make_model("llama", layers=2), "window", 8, evict_every=value)


def test_bad_attn_backend(make_model):
    with pytest.raises(ValueError, match="'flash'"):
        squeezekv.make_cache(make_model("llama", layers=2), "window", 8, attn_backend="flash")


def test_unsupported_model_type():
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with pytest.raises(ValueError, match="'gpt2'") as err:
        squeezekv.make_cache(model, "window", 8)
    assert "llama" in str(err.value)  # names the supported ones
    assert model.config._attn_implementation != "squeezekv"  # the model was left alone


def test_plan_with_wrong_number_of_layers(make_model):
    plan = BudgetPlan(budgets=(16, 16), base=16, allocation="custom")
    with pytest.raises(ValueError, match="plan has 2 layers but the model has 4"):
        squeezekv.make_cache(make_model("llama"), "window", 16, plan=plan)


def test_plan_must_skip_unmanaged_sliding_layers(make_model):
    model = make_model("gemma3_text")
    with pytest.raises(ValueError, match="plan layer 0"):
        squeezekv.make_cache(model, "window", 16, plan=BudgetPlan(budgets=(16,) * 4, base=16, allocation="x"))
    squeezekv.make_cache(model, "window", 16, plan=BudgetPlan(budgets=(None, 16, None, 16), base=16, allocation="x"))


def test_prompt_longer_than_context(make_model, make_ids):
    model = make_model("llama", max_position_embeddings=32)
    cache = squeezekv.make_cache(model, "window", 8)
    with pytest.raises(ValueError, match="40 tokens is longer than the model's context of 32"):
        model(make_ids(1, 40), cache=cache)


def test_decoding_past_the_context(make_model, make_ids):
    model = make_model("llama", max_position_embeddings=32)
    cache = squeezekv.make_cache(model, "window", 8)
    model(make_ids(1, 32), cache=cache)
    with pytest.raises(ValueError, match="33 tokens is longer than the model's context of 32"):
        model(make_ids(1, 1), cache=cache)


def test_generate_prompt_longer_than_context(make_model, make_ids, run_greedy):
    model = make_model("llama", max_position_embeddings=32)
    cache = squeezekv.make_cache(model, "h2o", 8, "squeeze")
    with pytest.raises(ValueError, match="longer than the model's context of 32"):
        run_greedy(model, make_ids(1, 40), cache=cache, new_tokens=2)


def test_right_padding_is_refused(make_model, make_ids):
    model = make_model("llama")
    ids = make_ids(2, 16)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    cache = squeezekv.make_cache(model, "window", 8)
    with pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=mask, cache=cache)


def test_right_padding_refused_in_generate(make_model, make_ids, run_greedy):
    model = make_model("llama")
    ids = make_ids(2, 16)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    cache = squeezekv.make_cache(model, "snapkv", 12, method_params={"window": 4})
    with pytest.raises(ValueError, match="right padding"):
        run_greedy(model, ids, mask, cache=cache, new_tokens=2)


def test_attention_mask_must_cover_whole_sequence(make_model, make_left_padded):
    model = make_model("llama")
    ids, mask = make_left_padded([16, 10], 16)
    cache = squeezekv.make_cache(model, "window", 8)
    model(ids, attention_mask=mask, cache=cache)
    with pytest.raises(ValueError, match="attention_mask covers 1 tokens but layer 0 has seen 17"):
        model(ids[:, :1], attention_mask=torch.tensor([[1], [0]]), cache=cache)


def test_four_d_mask_refused(make_model, make_ids):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "window", 8)
    mask4d = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match="4-D attention mask"):
        model(make_ids(1, 16), attention_mask=mask4d, cache=cache)


def test_batch_of_mismatched_lengths_without_padding_is_refused():
    with pytest.raises(ValueError, match=r"lengths \[3, 5\] and no pad_token_id"):
        squeezekv.left_pad([[1, 2, 3], [1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="empty"):
        squeezekv.left_pad([])


def test_left_pad_feeds_a_compressed_cache(make_model):
    batch = squeezekv.left_pad([[5, 6, 7], [1, 2, 3, 4, 5]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "window", 2, "uniform")
    model(**batch, cache=cache)
    assert cache.layers[0].token_idx[0, 0].tolist() == [3, 4]  # the row's last real tokens, never padding
