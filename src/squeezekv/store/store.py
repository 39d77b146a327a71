"""The KV store: content-addressed snapshots in a hierarchy of tiers, LRU with queue-aware eviction and prefetch,
asynchronous saving.

Follows AttentionStore / CachedAttention (Gao et al., USENIX ATC 2024, arXiv 2403.19708):

* hierarchy (section 3.1): tiers ordered fast to slow (GPU HBM, host DRAM, SSD), each with a byte capacity; a new
  entry goes to the fastest tier, making room by demoting that tier's victims one tier down (the slowest tier drops
  them); an entry that is read is promoted back to the fastest tier;
* scheduler-aware eviction and prefetch (section 3.3): the requests waiting in the queue are known to the store
  (:meth:`KVStore.enqueue`); their entries are evicted last and are promoted ahead of their turn;
* asynchronous saving (section 3.2): :meth:`KVStore.save_async` returns at once, the copy into the tier happens on a
  background thread;
* entries are keyed by a hash chain over token blocks (:mod:`squeezekv.store.keys`), so any shared prefix is found;
  full caches can be cropped to the shared prefix, compressed ones are reused only when their whole history is a prefix
  of the new prompt (a compressed cache's state depends on everything it saw).

Nothing is reused unless its tokens equal the new prompt's: the tokens a snapshot holds are compared with the prompt on
every hit (hash collisions or an edited file cannot cause wrong KV).

Entries can be scoped (``scope=``, e.g. one per user or API key): the scope is hashed into the chain's root, so an entry
is found only by lookups of the same scope (nothing is shared across scopes, not even its presence).

A tier that fails (an unwritable or unreadable disk folder) never fails a request: the entry is skipped, a miss
counted and the error logged and counted (``error_<tier>``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .keys import DEFAULT_BLOCK, chain, entry_key
from .snapshot import KVSnapshot
from .tiers import CorruptEntry, DiskTier, Tier, TierError

log = logging.getLogger("squeezekv.store")


@dataclass
class Entry:
    """Bookkeeping of one stored snapshot (its tensors live in ``tier``)."""

    key: str
    tokens: tuple[int, ...]
    croppable: bool
    nbytes: int
    tier: int
    last_used: float
    index_hashes: list[str] = field(default_factory=list)
    root: str = ""  # the hash chain's root it was keyed under (the store's, or a scope's)
    prefetched_from: str | None = None  # tier it was promoted from ahead of its request (its hit counts there)


@dataclass(frozen=True)
class Match:
    """A usable entry for a prompt: its key and how many leading prompt tokens its KV covers."""

    key: str
    length: int
    tier: str


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KVStore:
    """Tiered, content-addressed KV snapshots. Thread-safe.

    ``tiers``: fast to slow; ``root``: the hash chain's namespace (:func:`squeezekv.store.keys.namespace` of the model
    and cache configuration); ``block``: tokens per hashed block; ``clock``: time source for LRU (a fake clock in
    tests)."""

    def __init__(self, tiers: Sequence[Tier], root: str, *, block: int = DEFAULT_BLOCK,
                 clock: Callable[[], float] = time.monotonic):
        if not tiers:
            raise ValueError("a KV store needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names {names} are not unique")
        self.tiers = list(tiers)
        self.root = root
        self.block = block
        self.clock = clock
        self.entries: dict[str, Entry] = {}
        self.index: dict[str, set[str]] = {}
        self.wanted: dict[str, str] = {}  # queued request id -> key of the entry it will reuse
        self.stats: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-save")
        self._pending: list[tuple[Future, tuple[int, ...]]] = []  # (save, its tokens)
        for i, tier in enumerate(self.tiers):
            if isinstance(tier, DiskTier):
                self._recover(i, tier)

    def _recover(self, tier_idx: int, tier: DiskTier) -> None:
        """Index the entries an earlier run left on disk (same namespace only; others are left alone), oldest
        dropped first if they exceed the capacity."""
        found = [(k, h, m) for k, h, m in tier.scan() if h.get("root") == self.root]
        found.sort(key=lambda x: x[2])
        for key, header, _mtime in found:
            tokens = tuple(int(t) for t in header["tokens"])
            root = str(header.get("chain_root") or self.root)
            hashes = chain(tokens, root, self.block)
            index_hashes = [root] + hashes if header["croppable"] else [hashes[-1] if hashes else root]
            entry = Entry(key, tokens, bool(header["croppable"]), int(header["nbytes"]), tier_idx, self.clock(),
                          index_hashes, root)
            tier.adopt(key, entry.nbytes)
            self.entries[key] = entry
            for h in index_hashes:
                self.index.setdefault(h, set()).add(key)
            self.stats["recovered"] += 1
        for victim in sorted((e for e in self.entries.values() if e.tier == tier_idx), key=lambda e: e.last_used):
            if tier.used <= tier.capacity:
                break
            self.stats[f"evicted_{tier.name}"] += 1
            self._drop(victim)

    def scoped_root(self, scope: str | None) -> str:
        """The chain root of ``scope`` (None: the store's own root, shared by every unscoped lookup)."""
        if scope is None:
            return self.root
        return hashlib.sha256(f"{self.root}|scope|{scope}".encode()).hexdigest()

    # -- lookup ---------------------------------------------------------------------------------------------------
    def _usable(self, entry: Entry, tokens: Sequence[int]) -> int:
        limit = len(tokens) - 1  # at least one prompt token must be computed to get the next token's logits
        if entry.croppable:
            return min(_common_prefix(entry.tokens, tokens), limit)
        n = len(entry.tokens)
        return n if n <= limit and tuple(tokens[:n]) == entry.tokens else 0

    def lookup(self, tokens: Sequence[int], scope: str | None = None) -> Match | None:
        """The entry of ``scope`` covering the longest prefix of ``tokens`` (leaving at least the last token to
        compute)."""
        root = self.scoped_root(scope)
        hashes = chain(tokens, root, self.block)
        with self._lock:
            best: tuple[int, str] | None = None
            for i in range(len(hashes), -1, -1):
                if best is not None and best[0] >= (i + 1) * self.block:
                    break  # entries registered at shorter prefixes cannot cover more
                for key in self.index.get(hashes[i - 1] if i else root, ()):
                    n = self._usable(self.entries[key], tokens)
                    if n > 0 and (best is None or n > best[0]):
                        best = (n, key)
            if best is None:
                return None
            return Match(best[1], best[0], self.tiers[self.entries[best[1]].tier].name)

    def load(self, match: Match, tokens: Sequence[int] | None = None) -> KVSnapshot | None:
        """The snapshot of ``match`` (cropped to ``match.length`` when the entry is longer), promoted to the fastest
        tier. None if it was evicted since the lookup, failed its checks (a corrupt entry is dropped: recompute) or
        its tier failed. The snapshot's own tokens must equal the entry's and, when ``tokens`` (the prompt) is given,
        the prompt's first ``match.length`` tokens; otherwise the entry counts as corrupt."""
        with self._lock:
            entry = self.entries.get(match.key)
            if entry is None:
                self.stats["miss_evicted"] += 1
                return None
            tier = self.tiers[entry.tier]
            snap = self._read(entry)
            if snap is None:
                return None
            n = match.length
            if tuple(snap.tokens) != entry.tokens or (tokens is not None and (
                    len(tokens) < n or tuple(snap.tokens[:n]) != tuple(int(t) for t in tokens[:n]))):
                log.warning("KV store: entry %s holds other tokens than expected: dropped", entry.key)
                self.stats[f"corrupt_{tier.name}"] += 1
                self._drop(entry)
                return None
            self.stats[f"hit_{entry.prefetched_from or tier.name}"] += 1
            entry.prefetched_from = None
            entry.last_used = self.clock()
            if entry.tier != 0:
                self._move(entry, snap, 0, promote=True)
            if len(snap.tokens) > match.length:
                snap = snap.crop(match.length)
            return snap

    def _read(self, entry: Entry) -> KVSnapshot | None:
        """The entry's snapshot from its tier; None (entry dropped, counted) if it is corrupt or the tier failed."""
        tier = self.tiers[entry.tier]
        try:
            return tier.get(entry.key)
        except CorruptEntry as err:
            log.warning("KV store: %s", err)
            self.stats[f"corrupt_{tier.name}"] += 1
        except TierError as err:
            log.warning("KV store: %s", err)
            self.stats[f"error_{tier.name}"] += 1
        self._drop(entry)
        return None

    def get(self, tokens: Sequence[int], scope: str | None = None) -> KVSnapshot | None:
        """``lookup`` then ``load`` (in ``scope``); counts a miss when nothing usable is stored. An entry that fails
        to load is dropped and the next best (a shorter prefix) is tried. Waits first for the asynchronous saves that
        share at least one block with ``tokens`` (the previous turn's save may still be in flight)."""
        self._wait_pending(tokens)
        for _ in range(8):  # each failed try drops its entry: bounded retries over shorter prefixes
            match = self.lookup(tokens, scope)
            if match is None:
                break
            snap = self.load(match, tokens)
            if snap is not None:
                return snap
        with self._lock:
            self.stats["miss"] += 1
        return None

    # -- saving ---------------------------------------------------------------------------------------------------
    def put(self, snapshot: KVSnapshot, scope: str | None = None) -> str:
        """Store ``snapshot`` (in ``scope``) in the fastest tier that can hold it (demoting others); returns its
        key."""
        root = self.scoped_root(scope)
        key = entry_key(snapshot.tokens, root, self.block)
        nbytes = snapshot.nbytes()
        with self._lock:
            old = self.entries.get(key)
            if old is not None:
                old.last_used = self.clock()
                return key
            hashes = chain(snapshot.tokens, root, self.block)
            if snapshot.croppable:
                index_hashes = [root] + hashes
            else:
                index_hashes = [hashes[-1] if hashes else root]
            entry = Entry(key, tuple(snapshot.tokens), snapshot.croppable, nbytes, -1, self.clock(), index_hashes,
                          root)
            if self._place(entry, snapshot, 0):
                self.entries[key] = entry
                for h in index_hashes:
                    self.index.setdefault(h, set()).add(key)
                self.stats["saved"] += 1
            else:
                self.stats["too_large"] += 1
        return key

    def save_async(self, snapshot: KVSnapshot, scope: str | None = None) -> Future:
        """:meth:`put` on the background saver thread (the request returns without waiting)."""
        fut = self._saver.submit(self.put, snapshot, scope)
        with self._lock:
            self._pending = [(f, t) for f, t in self._pending if not f.done()] + [(fut, snapshot.tokens)]
        return fut

    def _wait_pending(self, tokens: Sequence[int]) -> None:
        with self._lock:
            pending = [f for f, t in self._pending if not f.done() and _common_prefix(t, tokens) >= self.block]
        for f in pending:
            try:
                f.result()
            except Exception as err:  # a failed save is a later miss, never this request's failure
                log.warning("KV store: a save failed: %s: %s", type(err).__name__, err)

    def flush(self) -> None:
        """Wait for every pending asynchronous save (and re-raise its error, if any)."""
        with self._lock:
            pending = [f for f, _ in self._pending]
        for f in pending:
            f.result()

    def close(self) -> None:
        """Finish the pending saves (their errors are logged), then release the tiers (the disk folder's lock)."""
        try:
            self.flush()
        except Exception as err:
            log.warning("KV store: a save failed: %s: %s", type(err).__name__, err)
        self._saver.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

    # -- the request queue ----------------------------------------------------------------------------------------
    def enqueue(self, request_id: str, tokens: Sequence[int], prefetch: bool = True,
                scope: str | None = None) -> Match | None:
        """A request entered the queue: protect its entry from eviction and (``prefetch``) promote it now, so its KV
        is in the fastest tier when it runs."""
        match = self.lookup(tokens, scope)
        with self._lock:
            if match is None:
                return None
            self.wanted[request_id] = match.key
            entry = self.entries.get(match.key)
            if prefetch and entry is not None and entry.tier != 0:
                origin = self.tiers[entry.tier].name
                snap = self._read(entry)
                if snap is None:
                    return None
                self._move(entry, snap, 0, promote=True)
                if entry.key in self.entries and entry.prefetched_from is None:
                    entry.prefetched_from = origin
                self.stats["prefetched"] += 1
        return match

    def dequeue(self, request_id: str) -> None:
        """The request left the queue (it runs now, or was cancelled)."""
        with self._lock:
            self.wanted.pop(request_id, None)

    # -- placement ------------------------------------------------------------------------------------------------
    def _victims(self, tier_idx: int, exclude: str) -> list[Entry]:
        """Eviction order in a tier: entries no queued request needs, least recently used first; then needed ones."""
        wanted = set(self.wanted.values())
        here = [e for e in self.entries.values() if e.tier == tier_idx and e.key != exclude]
        return sorted(here, key=lambda e: (e.key in wanted, e.last_used))

    def _place(self, entry: Entry, snapshot: KVSnapshot, start: int) -> bool:
        """Put ``entry`` into the first tier from ``start`` on that can hold it, demoting victims; False if none can."""
        for i in range(start, len(self.tiers)):
            tier = self.tiers[i]
            if entry.nbytes > tier.capacity:
                continue
            for victim in self._victims(i, entry.key):
                if tier.used + entry.nbytes <= tier.capacity:
                    break
                self._demote(victim)
            if tier.used + entry.nbytes > tier.capacity:  # pragma: no cover - victims always free enough
                continue
            try:
                if isinstance(tier, DiskTier):
                    tier.put(entry.key, snapshot, entry.nbytes, root=self.root, chain_root=entry.root or self.root)
                else:
                    tier.put(entry.key, snapshot, entry.nbytes)
            except (TierError, OSError) as err:  # this tier failed: try the next one; never fail the caller
                log.warning("KV store: %s tier failed: %s", tier.name, err)
                self.stats[f"error_{tier.name}"] += 1
                continue
            entry.tier = i
            return True
        return False

    def _demote(self, victim: Entry) -> None:
        src = self.tiers[victim.tier]
        if victim.tier + 1 >= len(self.tiers):
            self.stats[f"evicted_{src.name}"] += 1
            self._drop(victim)
            return
        snap = self._read(victim)
        if snap is None:
            return
        self._move(victim, snap, victim.tier + 1, promote=False)

    def _move(self, entry: Entry, snapshot: KVSnapshot, dest: int, promote: bool) -> None:
        src = self.tiers[entry.tier]
        src.remove(entry.key)
        entry.tier = -1
        if self._place(entry, snapshot, dest):
            self.stats[("promoted_to_" if promote else "demoted_to_") + self.tiers[entry.tier].name] += 1
        else:
            self.stats[f"evicted_{src.name}"] += 1
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        if entry.tier >= 0:
            self.tiers[entry.tier].remove(entry.key)
        self.entries.pop(entry.key, None)
        for h in entry.index_hashes:
            keys = self.index.get(h)
            if keys is not None:
                keys.discard(entry.key)
                if not keys:
                    del self.index[h]

    # -- reporting ------------------------------------------------------------------------------------------------
    def usage(self) -> dict[str, dict[str, int]]:
        """Per tier: capacity, bytes used, entries."""
        with self._lock:
            return {t.name: {"capacity": t.capacity, "used": t.used, "entries": len(t.sizes)} for t in self.tiers}

    def tier_of(self, key: str) -> str | None:
        with self._lock:
            e = self.entries.get(key)
            return None if e is None else self.tiers[e.tier].name


__all__ = ["Entry", "Match", "KVStore"]
