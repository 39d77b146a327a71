"""Issue 18, item 9: clear messages and small fixes of ``squeezekv run``/``eval`` and the library's entry points —
tiny random models (tests/conftest.py) and the character tokenizer, no model hub."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

import squeezekv
from squeezekv import runner
from squeezekv.cli import main
from squeezekv.models import arch_spec
from squeezekv.serve.chartok import CharTokenizer
from squeezekv.spec import CacheSpec

ROOT = Path(__file__).resolve().parents[1]
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 3  # 240 characters


def _run(model, tmp_path, **cfg):
    path = tmp_path / "prompt.txt"
    path.write_text(TEXT)
    spec = {k: cfg.pop(k) for k in list(cfg) if k in CacheSpec.__dataclass_fields__ and k != "budget"}
    config = runner.RunConfig(prompt_file=str(path), max_new_tokens=4, cache=CacheSpec(**spec), **cfg)
    return runner.run(config, progress=False, loaded=(model, CharTokenizer()))


# -- the run header -------------------------------------------------------------------------------------------------
def test_run_header_shows_channel_crosslayer_and_prefill(make_model, tmp_path):
    model = make_model("llama")
    report = _run(model, tmp_path, method="window", budget=64, allocation="uniform", channel="kivi",
                  channel_params={"bits": 4, "group_size": 16, "residual": 16}, crosslayer="shared_attention",
                  crosslayer_params={"spans": [[1, 2]]}, prefill_chunk=50)
    head = runner.format_report(report).split("\n\n")[0]
    assert "channel kivi (bits=4, group_size=16, residual=16)" in head
    assert "cross-layer shared_attention (spans=[[1, 2]])" in head
    assert "prefill in chunks of 50 tokens" in head
    plain = runner.format_report(_run(model, tmp_path, method="window", budget=64, allocation="uniform"))
    assert "channel none; cross-layer none; one-pass prefill" in plain.split("\n\n")[0]


# -- --prefill-chunk ------------------------------------------------------------------------------------------------
def test_run_accepts_prefill_chunk():
    from squeezekv.cli import build_parser

    args = build_parser().parse_args(["run", "--prefill-chunk", "128"])
    assert args.prefill_chunk == 128
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk=.* is out of range"):
            runner.RunConfig(cache=CacheSpec(prefill_chunk=bad))
    assert main(["run", "--prefill-chunk", "0"]) == 2


def test_run_prefill_chunk_is_chunked_prefill(make_model, make_ids):
    """The runner's compressed prefill in chunks equals squeezekv.chunked_prefill then greedy steps, token for token
    and logit for logit; and it is not the one-pass prefill (H2O's scores differ when chunked)."""
    model = make_model("llama")
    prompt = make_ids(1, 60)[0].tolist()

    def factory():
        return squeezekv.make_cache(model, "h2o", 24, "uniform")

    ref_tokens = [5, 6, 7]
    chunked = factory()
    out = runner.measure(model, prompt, ref_tokens, chunked, lambda c: c.nbytes(), 6, set(), "cpu", False, "p", 16)
    cache = factory()
    logits = squeezekv.chunked_prefill(model, torch.tensor([prompt]), cache, 16)  # [1, vocab]
    ref = []
    for _ in range(6):
        ref.append(int(logits.argmax(-1)))
        logits = model(input_ids=torch.tensor([[ref[-1]]]), cache=cache, use_cache=True).logits[:, -1]
    assert out["tokens"] == ref
    assert chunked.physical_lengths() == cache.physical_lengths()
    for a, b in zip(chunked.layers, cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    one_pass = factory()
    one = runner.measure(model, prompt, ref_tokens, one_pass, lambda c: c.nbytes(), 6, set(), "cpu", False, "p")
    assert any(not torch.equal(a.keys, b.keys) for a, b in zip(one_pass.layers, cache.layers))
    assert out["reference_loglik"] != one["reference_loglik"]


# -- --model DIR without a model ------------------------------------------------------------------------------------
def test_model_folder_without_a_model_says_so(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["run", "--model", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"there is no model in '{tmp_path}': the folder has no config.json" in err
    assert "sentencepiece" not in err and "tiktoken" not in err and "Traceback" not in err
    assert main(["run", "--model", str(tmp_path / "notes.txt"), "--no-progress"]) == 2
    assert "is a file, not a checkpoint folder" in capsys.readouterr().err


# -- --prompt-file --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, fragment", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary (a NUL byte at offset 8)"),
    ("caf\u00e9 au lait".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3"),
])
def test_binary_prompt_file_is_refused_clearly(tmp_path, capsys, content, fragment):
    path = tmp_path / "prompt.bin"
    path.write_bytes(content)
    assert main(["run", "--prompt-file", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "codec" not in err


def test_folder_prompt_file_is_refused_clearly(tmp_path, capsys):
    assert main(["run", "--prompt-file", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a text file" in err and "does not exist" not in err
    assert main(["run", "--prompt-file", str(tmp_path / "missing.txt"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- eval's extras, checked before any work -------------------------------------------------------------------------
def test_eval_without_matplotlib_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import squeezekv.eval

    def no_work(*args, **kwargs):
        raise AssertionError("squeezekv eval started working without matplotlib")

    monkeypatch.setattr(squeezekv.eval, "evaluate", no_work)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importlib.util.find_spec now reports it missing
    out = tmp_path / "out"
    assert main(["eval", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib (the report's plots)" in err and "pip install -e '.[eval]'" in err
    assert not out.exists()


# -- cache= rather than the deprecated past_key_values= ---------------------------------------------------------------
def _no_past_key_values_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("error", message=".*past_key_values.*", category=category)
    return ctx


def test_generate_through_squeezekv_warns_nothing_about_past_key_values(make_model, make_ids):
    model = make_model("llama")
    ids = make_ids(1, 40)
    ctx = _no_past_key_values_warnings()
    try:
        # the README's one line, then the runner's loop and chunked prefill
        model.generate(ids, cache=squeezekv.make_cache(model, "snapkv", 24, "squeeze", method_params={"window": 4}),
                       max_new_tokens=4, do_sample=False, pad_token_id=0)
        runner.measure(model, ids[0].tolist(), [5, 6], squeezekv.make_cache(model, "h2o", 16), lambda c: c.nbytes(),
                       4, set(), "cpu", False, "p", 8)
        runner.measure(model, ids[0].tolist(), [5, 6], squeezekv.make_cache(model, "window", 16),
                       lambda c: c.nbytes(), 4, set(), "cpu", False, "p")
        # the deprecated spelling is caught by this filter (so the checks above can fail)
        with pytest.raises((FutureWarning, DeprecationWarning), match="past_key_values"):
            model.generate(ids, past_key_values=squeezekv.make_cache(model, "window", 16), max_new_tokens=2,
                           do_sample=False, pad_token_id=0)
    finally:
        ctx.__exit__(None, None, None)


def test_docs_examples_pass_cache_not_past_key_values():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "src/squeezekv/__init__.py"]:
        hits = [i + 1 for i, line in enumerate(path.read_text().splitlines())
                if re.search(r"(generate|model)\(.*past_key_values=", line) or "past_key_values=squeezekv" in line]
        assert not hits, f"{path.name} lines {hits} pass past_key_values= (deprecated): use cache="


# -- architecture checks --------------------------------------------------------------------------------------------
def _gemma3_multimodal():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                         max_position_embeddings=256),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    return Gemma3ForConditionalGeneration(config).eval()


def test_gemma3_conditional_generation_is_refused_at_the_architecture_check():
    model = _gemma3_multimodal()
    with pytest.raises(ValueError, match="'gemma3' is a multimodal model around a 'gemma3_text'.*Gemma3ForCausalLM"):
        arch_spec(model.config)
    with pytest.raises(ValueError, match="multimodal model.*Gemma3ForCausalLM"):
        squeezekv.make_cache(model, "window", 16)
    assert arch_spec(model.config.get_text_config()).attn_out_norm == "post_attention_layernorm"  # the text model


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)).eval()


@pytest.mark.parametrize("channel, params", [("eigen", {}), ("coupled", {}),
                                             ("eigen", {"calibration": "/no/such/file.pt"})])
def test_channel_methods_check_the_architecture_before_calibration(channel, params):
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported by squeezekv"):
        squeezekv.make_cache(_gpt2(), "none", 16, channel=channel, channel_params=params)


def test_calibration_functions_check_the_architecture_first():
    from squeezekv.channel import coupled, eigen_calibrate

    model = _gpt2()
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        coupled.calibrate(model, torch.randint(0, 128, (1, 16)), bits=1, channels=8)
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        eigen_calibrate.calibrate(model, [list(range(3, 19))])
