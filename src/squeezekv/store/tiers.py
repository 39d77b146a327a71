"""The storage tiers of the KV store: device memory (GPU HBM), host memory (DRAM) and disk (SSD).

AttentionStore (Gao et al., USENIX ATC 2024, arXiv 2403.19708, section 3) keeps each conversation's KV in a hierarchy
of HBM, DRAM and SSD with byte capacities. A tier here only stores and returns snapshots and accounts their bytes; the
:class:`~squeezekv.store.store.KVStore` decides what goes where.

The disk tier is crash-safe: each entry is written to a temporary file, fsynced and renamed into place (a crash
leaves either the old state or the new one, never a half-written entry), and carries a SHA-256 of its payload; a
truncated, corrupted or foreign file raises :class:`CorruptEntry` and is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from .snapshot import KVSnapshot, from_bytes, to_bytes

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1000, "KIB": 1 << 10, "M": 1 << 20, "MB": 1000 ** 2, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1000 ** 3, "GIB": 1 << 30, "T": 1 << 40, "TB": 1000 ** 4, "TIB": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """``"8GiB"`` -> 8589934592; ``"500MB"``, ``"1024"`` and ints work too; anything else raises naming the value."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"capacity {text} is out of range: must be >= 0 bytes")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"capacity {text!r} is not a size: write e.g. 8GiB, 500MB or 1048576")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class CorruptEntry(Exception):
    """A disk entry failed its checks (magic, length, checksum, key, decoding)."""


class Tier(ABC):
    """Byte-accounted map ``key -> snapshot``. ``name`` is ``"gpu"``, ``"cpu"`` or ``"disk"``."""

    def __init__(self, name: str, capacity: int):
        if capacity < 0:
            raise ValueError(f"{name} tier capacity {capacity} is out of range: must be >= 0")
        self.name = name
        self.capacity = capacity
        self.sizes: dict[str, int] = {}
        self.used = 0  # bytes charged: sum of sizes, kept up to date by _charge/_release

    def _charge(self, key: str, nbytes: int) -> None:
        self._release(key)
        self.sizes[key] = nbytes
        self.used += nbytes

    def _release(self, key: str) -> None:
        self.used -= self.sizes.pop(key, 0)

    def __contains__(self, key: str) -> bool:
        return key in self.sizes

    @abstractmethod
    def put(self, key: str, snapshot: KVSnapshot, nbytes: int) -> None:
        ...

    @abstractmethod
    def get(self, key: str) -> KVSnapshot:
        ...

    @abstractmethod
    def remove(self, key: str) -> None:
        ...


class MemoryTier(Tier):
    """Snapshots held as tensors on ``device`` (``cuda`` for the GPU tier, ``cpu`` for the host tier; host copies of
    GPU tensors are pinned so the layer-wise loader can copy them back asynchronously)."""

    def __init__(self, name: str, capacity: int, device: str | torch.device = "cpu"):
        super().__init__(name, capacity)
        self.device = torch.device(device)
        self.entries: dict[str, KVSnapshot] = {}

    def put(self, key: str, snapshot: KVSnapshot, nbytes: int) -> None:
        moved = snapshot if snapshot.device() == self.device else snapshot.to(self.device)
        if self.device.type == "cpu" and torch.cuda.is_available():
            for layer in moved.layers:
                layer.tensors = {k: t.pin_memory() for k, t in layer.tensors.items()}
        self.entries[key] = moved
        self._charge(key, nbytes)

    def get(self, key: str) -> KVSnapshot:
        return self.entries[key]

    def remove(self, key: str) -> None:
        self.entries.pop(key, None)
        self._release(key)


_MAGIC = b"SQKV\x00\x01\r\n"
_HEADER = struct.Struct("<8sQ")  # magic, header JSON length


class DiskTier(Tier):
    """One file per entry in ``root``: magic, header (key, payload length, SHA-256), payload (:func:`to_bytes`)."""

    def __init__(self, root: str | os.PathLike, capacity: int):
        super().__init__("disk", capacity)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("*.tmp"):  # left by a crash mid-write: never complete, never renamed
            stale.unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ValueError(f"key {key!r} is not a SHA-256 hex digest")
        return self.root / f"{key}.kv"

    def put(self, key: str, snapshot: KVSnapshot, nbytes: int, root: str = "") -> None:
        payload = to_bytes(snapshot)
        header = json.dumps({"key": key, "length": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                             "root": root, "tokens": list(snapshot.tokens), "croppable": snapshot.croppable,
                             "nbytes": nbytes}).encode()
        final = self.path(key)
        tmp = final.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, len(header)))
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic on POSIX: readers see the old file or the complete new one
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
        self._charge(key, nbytes)

    def scan(self) -> list[tuple[str, dict, float]]:
        """``(key, header, mtime)`` of every entry file in the folder (left by an earlier run). Only the header is
        read and checked here; the payload's checksum is checked when the entry is loaded. Files whose header is
        unreadable are deleted (a crash cannot produce them: they are corrupt)."""
        out = []
        for path in sorted(self.root.glob("*.kv")):
            key = path.stem
            try:
                with open(path, "rb") as f:
                    magic, hlen = _HEADER.unpack(f.read(_HEADER.size))
                    if magic != _MAGIC or hlen > 1 << 30:
                        raise ValueError(f"bad magic {magic!r}")
                    header = json.loads(f.read(hlen))
                if header.get("key") != key:
                    raise ValueError(f"header names key {header.get('key')!r}")
                out.append((key, header, path.stat().st_mtime))
            except (OSError, ValueError, struct.error, UnicodeDecodeError):
                path.unlink(missing_ok=True)
        return out

    def adopt(self, key: str, nbytes: int) -> None:
        """Account an entry found by :meth:`scan`."""
        self._charge(key, nbytes)

    def get(self, key: str) -> KVSnapshot:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CorruptEntry(f"{path}: cannot be read ({err})") from err
        if len(data) < _HEADER.size:
            raise CorruptEntry(f"{path}: {len(data)} bytes, shorter than the header")
        magic, hlen = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise CorruptEntry(f"{path}: bad magic {magic!r}")
        try:
            header = json.loads(data[_HEADER.size:_HEADER.size + hlen])
        except (ValueError, UnicodeDecodeError) as err:
            raise CorruptEntry(f"{path}: unreadable header ({err})") from err
        payload = data[_HEADER.size + hlen:]
        if header.get("key") != key:
            raise CorruptEntry(f"{path}: holds key {header.get('key')!r}, expected {key!r}")
        if len(payload) != header.get("length"):
            raise CorruptEntry(f"{path}: payload of {len(payload)} bytes, header says {header.get('length')}")
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise CorruptEntry(f"{path}: checksum mismatch")
        try:
            return from_bytes(payload)
        except Exception as err:  # a payload that hashes right but does not decode (e.g. another version)
            raise CorruptEntry(f"{path}: payload does not decode ({err})") from err

    def remove(self, key: str) -> None:
        self._release(key)
        self.path(key).unlink(missing_ok=True)


__all__ = ["parse_bytes", "CorruptEntry", "Tier", "MemoryTier", "DiskTier"]
