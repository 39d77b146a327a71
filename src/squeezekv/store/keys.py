"""Content addressing of KV entries: a hash chain over fixed-size token blocks.

CachedAttention / AttentionStore (Gao et al., USENIX ATC 2024, arXiv 2403.19708) keys a conversation's KV by its
session; here, as in vLLM's automatic prefix caching, an entry is keyed by the tokens it encodes, so any shared prefix
(the same system prompt in another session, a replayed conversation) finds it. ``h_0 = H(namespace)``,
``h_i = H(h_{i-1} || block_i)``: equal hashes at block ``i`` mean equal first ``i`` blocks (up to SHA-256 collisions,
which the store rules out anyway by comparing the tokens before it reuses anything).

The namespace binds the chain to one model and one cache configuration: KV of another model, dtype or compression
method is never reused.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from typing import Any, Sequence

#: tokens per hashed block (a prefix is matched in whole blocks, then extended token by token)
DEFAULT_BLOCK = 16


def namespace(**identity: Any) -> str:
    """Hex digest of a JSON description of the model and cache configuration (the chain's root)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _block_bytes(tokens: Sequence[int]) -> bytes:
    return array("q", [int(t) for t in tokens]).tobytes()


def chain(tokens: Sequence[int], root: str, block: int = DEFAULT_BLOCK) -> list[str]:
    """``[h_1, ..., h_k]`` for the ``k = len(tokens) // block`` whole blocks of ``tokens`` (the tail is not hashed)."""
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block={block!r} is out of range: must be an integer >= 1")
    out: list[str] = []
    h = root
    for start in range(0, len(tokens) - len(tokens) % block, block):
        h = hashlib.sha256(h.encode() + _block_bytes(tokens[start:start + block])).hexdigest()
        out.append(h)
    return out


def entry_key(tokens: Sequence[int], root: str, block: int = DEFAULT_BLOCK) -> str:
    """Key of an entry holding the KV of exactly ``tokens``: the chain's last hash, then the tail and the length."""
    hashes = chain(tokens, root, block)
    last = hashes[-1] if hashes else root
    tail = tokens[len(hashes) * block:]
    return hashlib.sha256(last.encode() + b"|tail|" + _block_bytes(tail) + f"|{len(tokens)}".encode()).hexdigest()


__all__ = ["DEFAULT_BLOCK", "namespace", "chain", "entry_key"]
