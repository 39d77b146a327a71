"""Multi-turn KV reuse across GPU / CPU / disk tiers (CachedAttention / AttentionStore, Gao et al., USENIX ATC 2024,
arXiv 2403.19708): snapshots of (compressed) caches, content-addressed by a hash chain over token blocks."""

from .keys import DEFAULT_BLOCK, chain, entry_key, namespace
from .loader import LayerwiseLoad
from .snapshot import KVSnapshot, LayerState, capture, from_bytes, restore, shift_positions, to_bytes
from .store import Entry, KVStore, Match
from .tiers import LOCK_NAME, CorruptEntry, DiskTier, FolderInUse, MemoryTier, Tier, TierError, parse_bytes

__all__ = [
    "DEFAULT_BLOCK", "chain", "entry_key", "namespace", "LayerwiseLoad", "KVSnapshot", "LayerState", "capture",
    "from_bytes", "restore", "shift_positions", "to_bytes", "Entry", "KVStore", "Match", "CorruptEntry", "DiskTier",
    "MemoryTier", "Tier", "parse_bytes", "TierError", "FolderInUse", "LOCK_NAME",
]
