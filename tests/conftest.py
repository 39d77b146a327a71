"""Shared fixtures: tiny random models of every supported architecture, built from configs only (no network).

Every model is float32, hidden size 64, vocab 128, built under ``torch.manual_seed`` so the tests are deterministic.
Factories are exposed as fixtures returning callables (so the tests work whatever pytest import mode is used).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as hf_logging

VOCAB = 128
PAD = 0
BOS = 1
EOS = 2

torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to CPU contention
hf_logging.set_verbosity_error()


def _common(num_layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: 2 query heads per KV head
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )


def _gemma_layer_types(n: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


#: architecture -> (config class, model class, extra config kwargs given the number of layers)
ARCHS: dict[str, tuple[type, type, Callable[[int], dict[str, Any]]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, lambda n: {}),
    # every layer has the same sliding window, smaller than the test sequences: squeezekv manages all layers
    "mistral": (MistralConfig, MistralForCausalLM, lambda n: {"sliding_window": 8}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, lambda n: {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, lambda n: {"head_dim": 16}),
    # hybrid: sliding (window 8) and full layers interleaved; only the full layers are managed
    "gemma3_text": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        lambda n: {"head_dim": 16, "sliding_window": 8, "layer_types": _gemma_layer_types(n)},
    ),
    "phi3": (Phi3Config, Phi3ForCausalLM, lambda n: {}),
}


def build_model(arch: str = "llama", *, layers: int = 4, attn: str | None = None, seed: int = 0, **overrides: Any):
    """A tiny random ``arch`` model in eval mode. ``attn``: attention implementation to switch to (default sdpa)."""
    config_cls, model_cls, extra = ARCHS[arch]
    kwargs = _common(layers)
    kwargs.update(extra(layers))
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Token ids that are never pad/bos/eos."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def left_padded(lengths: list[int], total: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``len(lengths)`` rows of width ``total``, row ``b`` having ``lengths[b]`` real
    tokens at the right end (left padding with PAD)."""
    ids = random_ids(len(lengths), total, seed)
    mask = torch.ones_like(ids)
    for b, n in enumerate(lengths):
        ids[b, : total - n] = PAD
        mask[b, : total - n] = 0
    return ids, mask


def greedy(model, input_ids, attention_mask=None, cache=None, new_tokens: int = 20):
    """Greedy ``generate`` producing exactly ``new_tokens`` tokens, returning scores and logits of every step."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
    )
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if cache is not None:
        kwargs["cache"] = cache
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids, **kwargs)


def assert_same_generation(ref, out, atol: float = 1e-5) -> None:
    """Same sequences, and logits/scores of every step equal to ``atol`` (scores may hold -inf: compared as equal)."""
    assert torch.equal(ref.sequences, out.sequences), (ref.sequences, out.sequences)
    assert len(ref.logits) == len(out.logits) == len(ref.scores) == len(out.scores)
    for step, (a, b) in enumerate(zip(ref.logits, out.logits)):
        torch.testing.assert_close(b, a, atol=atol, rtol=0, msg=lambda m: f"logits of step {step}: {m}")
    for step, (a, b) in enumerate(zip(ref.scores, out.scores)):
        torch.testing.assert_close(b, a, atol=atol, rtol=0, msg=lambda m: f"scores of step {step}: {m}")


def default_method_params(method: str) -> dict[str, Any]:
    """Parameters that make every method usable with the tests' short prompts."""
    return {"window": 8} if method == "snapkv" else {}


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture
def make_model():
    return build_model


@pytest.fixture
def make_left_padded():
    return left_padded


@pytest.fixture
def make_ids():
    return random_ids


@pytest.fixture
def run_greedy():
    return greedy


@pytest.fixture
def same_generation():
    return assert_same_generation


@pytest.fixture
def method_params():
    return default_method_params


@pytest.fixture(autouse=True)
def _no_grad_and_seed():
    torch.manual_seed(1234)
    with torch.no_grad():
        yield



WORDS = ("the cat sat on a mat and we saw many quiet ships under bright stars while old friends "
         "wrote long letters about rivers hills towns roads music bread").split()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer over ``WORDS`` (capitalised too) and ``.?:,`` — for commands that take text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    for w in WORDS + [w.capitalize() for w in WORDS] + list(".?:,"):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def word_text():
    """``word_text(seed, sentences)``: deterministic sentences of ``WORDS`` (every token known to tiny_tokenizer)."""
    import random

    def make(seed: int, n: int) -> str:
        rng = random.Random(seed)
        return " ".join(" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "." for _ in range(n))

    return make
