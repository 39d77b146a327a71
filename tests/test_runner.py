"""`squeezekv run`'s machinery on a tiny random model: progress bars on (the default), the budget sweep table."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from squeezekv import make_cache
from squeezekv.runner import measure


def test_progress_bars_do_not_replace_layer_outputs(make_model, make_ids, monkeypatch, capsys):
    """tqdm's update() returns True when it redraws; the per-layer hook must not hand that back as the layer's output.
    Here every update reports a redraw (as on a slow real prefill, where each layer takes longer than tqdm's
    mininterval)."""
    from tqdm.auto import tqdm

    update = tqdm.update

    def redraws(self, n=1):
        update(self, n)
        return True

    monkeypatch.setattr(tqdm, "update", redraws)
    model = make_model("llama", layers=3)
    prompt = make_ids(1, 40)[0].tolist()
    ref = prompt[-8:]
    quiet = measure(model, prompt, ref, DynamicCache(config=model.config), lambda c: 0, 4, set(), "cpu", False, "p")
    shown = measure(model, prompt, ref, DynamicCache(config=model.config), lambda c: 0, 4, set(), "cpu", True,
                    "prefill")
    assert shown["tokens"] == quiet["tokens"]
    assert shown["reference_loglik"] == quiet["reference_loglik"]
    compressed = measure(model, prompt, ref, make_cache(model, "snapkv", 0.5, "uniform", method_params={"window": 8}),
                         lambda c: c.nbytes(), 4, set(), "cpu", True, "prefill")
    assert len(compressed["tokens"]) == 4
    assert "prefill" in capsys.readouterr().err


def _teacher_forced(model, prompt, reference, cache):
    """Reference: log p(reference | prompt) from a fresh prefill, one token per step."""
    logits = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True).logits[:, -1]
    total = 0.0
    for i, tok in enumerate(reference):
        total += float(torch.log_softmax(logits.float(), dim=-1)[0, tok])
        if i + 1 < len(reference):
            logits = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True).logits[:, -1]
    return total


@pytest.mark.parametrize("method", ["full", "window", "h2o", "snapkv"])
def test_measure_scores_the_reference_on_a_copy_of_the_prefilled_cache(make_model, make_ids, method):
    """One prefill serves both the reference score (on a copy) and greedy decoding (on the cache): the score equals a
    fresh prefill's bit for bit, and the greedy tokens equal a run that never scored the reference."""
    model = make_model("llama", layers=3)
    prompt, ref = make_ids(1, 60)[0].tolist(), make_ids(1, 8, seed=5)[0].tolist()

    def cache():
        if method == "full":
            return DynamicCache(config=model.config)
        return make_cache(model, method, 0.5, "uniform", method_params={"window": 8} if method == "snapkv" else {})

    res = measure(model, prompt, ref, cache(), lambda c: 0, 6, set(), "cpu", False, "p")
    assert res["reference_loglik"] == _teacher_forced(model, prompt, ref, cache())
    tokens, c = [], cache()
    logits = model(input_ids=torch.tensor([prompt]), cache=c, use_cache=True).logits[:, -1]
    for _ in range(6):
        tokens.append(int(logits.argmax(-1)))
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), cache=c, use_cache=True).logits[:, -1]
    assert res["tokens"] == tokens


def _run_tiny(tmp_path, make_model, tiny_tokenizer, word_text, **kw):
    from squeezekv.runner import RunConfig, run
    from squeezekv.spec import CacheSpec

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(word_text(3, 25))  # 25 sentences x 9 tokens
    model = make_model("llama", layers=3, vocab_size=len(tiny_tokenizer), max_position_embeddings=512)
    spec = CacheSpec(method=kw.pop("method"), allocation="uniform")
    cfg = RunConfig(prompt_file=str(prompt_file), max_new_tokens=3, cache=spec, **kw)
    return model, run(cfg, progress=True, loaded=(model, tiny_tokenizer))


def test_run_table_full_cache_and_each_budget(tmp_path, make_model, tiny_tokenizer, word_text):
    """The default run sweeps budgets 0.5/0.3/0.2; bytes of each column equal the formula for what it holds."""
    from squeezekv.runner import format_report

    model, report = _run_tiny(tmp_path, make_model, tiny_tokenizer, word_text, method="window")
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    n = report["prompt_tokens"]
    per_token = cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * 4  # K and V, float32
    assert report["full"]["kv_bytes_after_prefill"] == per_token * n
    assert [c["budget"] for c in report["compressed"]] == [0.5, 0.3, 0.2]
    per_token = cfg.num_key_value_heads * (2 * head_dim * 4 + 4)  # keys + values + int32 token index
    for c in report["compressed"]:
        assert c["layer_tokens"] == c["plan"]["budgets"]
        assert c["kv_bytes_after_prefill"] == per_token * c["plan"]["total"]
        assert c["summary"]["memory_ratio_after_prefill"] == c["kv_bytes_after_prefill"] / report["full"][
            "kv_bytes_after_prefill"]
    text = format_report(report)
    for row in ("full cache", "window 0.5", "window 0.3", "window 0.2", "per-layer plan of window 0.2"):
        assert row in text
    assert "found fact" not in text  # a prompt file has no hidden fact


def test_run_one_budget_is_one_column(tmp_path, make_model, tiny_tokenizer, word_text):
    _, report = _run_tiny(tmp_path, make_model, tiny_tokenizer, word_text, method="h2o", budget=0.4)
    assert [c["budget"] for c in report["compressed"]] == [0.4]
