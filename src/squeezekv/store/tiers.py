"""The storage tiers of the KV store: device memory (GPU HBM), host memory (DRAM) and disk (SSD).

AttentionStore (Gao et al., USENIX ATC 2024, arXiv 2403.19708, section 3) keeps each conversation's KV in a hierarchy
of HBM, DRAM and SSD with byte capacities. A tier here only stores and returns snapshots and accounts their bytes; the
:class:`~squeezekv.store.store.KVStore` decides what goes where.

The disk tier is crash-safe: each entry is written to a private temporary file, fsynced and renamed into place (a
crash leaves either the old state or the new one, never a half-written entry), and ends with a SHA-256 of the whole
file (header included); a truncated or corrupted file raises :class:`CorruptEntry` and is never used. A tier that
cannot read or write (permissions, a full disk) raises :class:`TierError`: the store treats it as a miss.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
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

    def close(self) -> None:  # noqa: B027 - optional hook: most tiers hold nothing outside the process
        """Release what the tier holds outside the process (the disk tier's folder lock)."""


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


#: file format version 2: the SHA-256 at the end covers everything before it (magic, header, payload)
_MAGIC = b"SQKV\x00\x02\r\n"
_HEADER = struct.Struct("<8sQ")  # magic, header JSON length
_DIGEST = 32
#: the lock file that makes one server own the folder
LOCK_NAME = ".squeezekv.lock"
_ENTRY = re.compile(r"[0-9a-f]{64}\.kv")
_TEMP = re.compile(r"\.[0-9a-f]{64}\.\d+\.[0-9a-f]{16}\.tmp")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

log = logging.getLogger("squeezekv.store")


class TierError(Exception):
    """A tier could not do what was asked (an unreadable or unwritable disk folder, say): the entry is a miss."""


class FolderInUse(Exception):
    """Another process holds the disk tier's folder (its lock file is locked)."""


class DiskTier(Tier):
    """One file per entry in ``root``: magic, header (key, payload length, tokens), payload (:func:`to_bytes`),
    SHA-256 of all of it.

    The folder is owned by one process at a time: a lock file (``.squeezekv.lock``, ``flock``) is held while the tier
    is open, and a second tier on the same folder raises :class:`FolderInUse`. The folder is made private (0700) and
    entries are written 0600 to a private temporary name (``O_CREAT | O_EXCL | O_NOFOLLOW``: a planted file or
    symbolic link is never written through), fsynced and renamed into place. Only files in this format are ever
    deleted: anything else in the folder is left alone."""

    def __init__(self, root: str | os.PathLike, capacity: int):
        super().__init__("disk", capacity)
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.root.stat().st_uid == os.getuid() and self.root.stat().st_mode & 0o077:
            os.chmod(self.root, 0o700)  # entries hold conversations: not for other users
        try:
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        except OSError as err:
            raise FolderInUse(f"disk cache folder {self.root}: cannot open its lock file ({err})") from err
        self._lock_file = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise FolderInUse(f"disk cache folder {self.root} is in use by another squeezekv process (it holds "
                              f"{self.root / LOCK_NAME}): give each server its own folder") from None
        # the lock is ours: temporary files in our naming scheme were left by a crashed writer, never renamed
        for stale in self.root.iterdir():
            if _TEMP.fullmatch(stale.name) and not stale.is_symlink():
                stale.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the folder (closing the lock file releases the lock)."""
        if not self._lock_file.closed:
            self._lock_file.close()

    def path(self, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ValueError(f"key {key!r} is not a SHA-256 hex digest")
        return self.root / f"{key}.kv"

    def put(self, key: str, snapshot: KVSnapshot, nbytes: int, root: str = "", chain_root: str = "") -> None:
        payload = to_bytes(snapshot)
        header = json.dumps({"key": key, "length": len(payload), "root": root, "chain_root": chain_root or root,
                             "tokens": list(snapshot.tokens), "croppable": snapshot.croppable,
                             "nbytes": nbytes}).encode()
        body = _HEADER.pack(_MAGIC, len(header)) + header + payload
        final = self.path(key)
        tmp = self.root / f".{key}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                    f.write(hashlib.sha256(body).digest())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)  # atomic; replaces a link at ``final`` itself, never its target
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the rename itself durable
            finally:
                os.close(dir_fd)
        except OSError as err:
            raise TierError(f"{final}: cannot be written ({err})") from err
        self._charge(key, nbytes)

    def scan(self) -> list[tuple[str, dict, float]]:
        """``(key, header, mtime)`` of every entry file in the folder (left by an earlier run). Only the header is
        read here; the whole file's checksum is checked when the entry is loaded. Files in this format whose header
        is unreadable are deleted; files in any other format (or links) are left alone and not indexed."""
        out = []
        for path in sorted(self.root.iterdir()):
            if not _ENTRY.fullmatch(path.name) or path.is_symlink() or not path.is_file():
                continue
            key = path.name[:-3]
            try:
                fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
                with os.fdopen(fd, "rb") as f:
                    start = f.read(_HEADER.size)
                    if len(start) < _HEADER.size or start[:len(_MAGIC)] != _MAGIC:
                        continue  # not in this version's format: not ours to delete
                    magic, hlen = _HEADER.unpack(start)
                    if hlen > 1 << 30:
                        raise ValueError(f"header length {hlen}")
                    header = json.loads(f.read(hlen))
                if header.get("key") != key:
                    raise ValueError(f"header names key {header.get('key')!r}")
                out.append((key, header, path.stat().st_mtime))
            except (OSError, ValueError, struct.error, UnicodeDecodeError) as err:
                log.warning("disk tier: dropping unreadable entry %s (%s)", path, err)
                path.unlink(missing_ok=True)
        return out

    def adopt(self, key: str, nbytes: int) -> None:
        """Account an entry found by :meth:`scan`."""
        self._charge(key, nbytes)

    def get(self, key: str) -> KVSnapshot:
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except FileNotFoundError as err:
            raise CorruptEntry(f"{path}: missing ({err})") from err
        except OSError as err:
            raise TierError(f"{path}: cannot be read ({err})") from err
        if len(data) < _HEADER.size + _DIGEST:
            raise CorruptEntry(f"{path}: {len(data)} bytes, shorter than the header")
        magic, hlen = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise CorruptEntry(f"{path}: bad magic {magic!r}")
        if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
            raise CorruptEntry(f"{path}: checksum mismatch")
        try:
            header = json.loads(data[_HEADER.size:_HEADER.size + hlen])
        except (ValueError, UnicodeDecodeError) as err:
            raise CorruptEntry(f"{path}: unreadable header ({err})") from err
        payload = data[_HEADER.size + hlen:-_DIGEST]
        if header.get("key") != key:
            raise CorruptEntry(f"{path}: holds key {header.get('key')!r}, expected {key!r}")
        if len(payload) != header.get("length"):
            raise CorruptEntry(f"{path}: payload of {len(payload)} bytes, header says {header.get('length')}")
        try:
            snap = from_bytes(payload)
        except Exception as err:  # a payload that hashes right but does not decode (e.g. another version)
            raise CorruptEntry(f"{path}: payload does not decode ({err})") from err
        if list(snap.tokens) != header.get("tokens"):
            raise CorruptEntry(f"{path}: the header's tokens differ from the payload's")
        return snap

    def remove(self, key: str) -> None:
        self._release(key)
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as err:
            log.warning("disk tier: cannot delete %s (%s)", self.path(key), err)


__all__ = ["parse_bytes", "CorruptEntry", "TierError", "FolderInUse", "Tier", "MemoryTier", "DiskTier", "LOCK_NAME"]
