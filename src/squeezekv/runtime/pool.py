"""The KV pool: preallocated keys/values of ``max_seqs`` sequence slots for every layer, admitted and released without
reallocation.

Per layer ``l`` (``S`` = ``max_seqs + 1`` rows: the last is a scratch row that the padding rows of a batch bucket
write to, never handed out; ``H`` = KV heads, ``C_l`` = the layer's capacity, ``D`` = head dim):

* ``keys[l]`` / ``values[l]`` ``[S, H, C_l, D]`` in the model's dtype (rotated keys, as the model caches them);
* ``positions[l]`` ``[S, H, C_l]`` int32: logical position of each filled entry (what ``SqueezeLayer.token_idx`` holds);
* ``scores[l]`` ``[S, H, C_l]`` float32, only for policies that score (H2O);
* ``lengths`` ``[L, S, H]`` int32: filled entries per (layer, slot, KV head) (heads may differ after per-head
  eviction), one tensor so a decode step advances every layer in one operation;
* ``seen`` ``[S]`` int64: tokens seen by each slot's sequence (the logical position of its next token).

Entries past ``lengths`` are never read by the decode attention; the buffers start zeroed so that a masked entry is
never NaN. ``capacity_l`` is the layer's budget plus the decode chunk for a policy that evicts while decoding, else the
budget plus the tokens to generate (:func:`pool_capacities`).

The pool also keeps a host-side mirror of ``lengths`` (per layer and slot, the largest head's count) and ``seen``, so
that the runtime decides when to evict without reading the device.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

import numpy as np
import torch

from ..plan import BudgetPlan


def pool_capacities(plan: BudgetPlan, chunk: int, evicts_while_decoding: bool, max_new_tokens: int,
                    context: int | None = None) -> list[int]:
    """Capacity of every layer of ``plan``: ``budget + chunk`` when the policy evicts down to the budget every
    ``chunk`` decode steps (window, streamingllm, h2o), else ``budget + max_new_tokens`` (snapkv: nothing is evicted
    while decoding); a layer the plan does not manage (``None``) holds a full cache of ``context + max_new_tokens``."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} is out of range: must be an integer >= 1")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is out of range: must be an integer >= 0")
    out = []
    for i, b in enumerate(plan.budgets):
        if b is None:
            if context is None:
                raise ValueError(f"layer {i} is not managed by the plan: give the context length for its full cache")
            out.append(context + max_new_tokens)
        else:
            out.append(b + (chunk if evicts_while_decoding else max_new_tokens))
    return out


class LayerStacks:
    """Buffers shared by the layers of one capacity: buffer ``g`` holds the ``Lg`` layers of the ``g``-th smallest
    capacity as ``[Lg, S, ...]``, layer ``l`` is its view ``[S, ...]`` at index ``j`` (``where[l] = (g, j)``), so an
    operation over rows of several layers of one capacity is one indexing of ``[Lg * S, ...]``."""

    def __init__(self, capacities: Sequence[int], rows: int, device: torch.device):
        self.capacities = sorted(set(capacities))
        self.where = [(self.capacities.index(c), sum(1 for x in capacities[:i] if x == c))
                      for i, c in enumerate(capacities)]
        self.counts = [sum(1 for x in capacities if x == c) for c in self.capacities]
        self.groups = np.asarray([g for g, _ in self.where], dtype=np.int64)  # [L]
        self.num_rows, self.device = rows, device

    def zeros(self, tail: Any, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(buffers, per-layer views)``: buffer ``g`` is ``[Lg, S, *tail(capacity_g)]`` zeros."""
        stacks = [torch.zeros((n, self.num_rows, *tail(c)), dtype=dtype, device=self.device)
                  for n, c in zip(self.counts, self.capacities)]
        return stacks, [stacks[g][j] for g, j in self.where]

    def rows(self, layers: int | Sequence[int] | np.ndarray, slots: Sequence[int] | np.ndarray | torch.Tensor
             ) -> tuple[int, torch.Tensor]:
        """Where the pairs ``(layers[i], slots[i])`` (or ``layers``, one layer, with every slot) live: ``(g, rows)``,
        ``rows`` ``[r]`` int64 on the device indexing the ``Lg * S`` rows of buffer ``g`` (``j * S + slot``). Raises
        when the layers differ in capacity."""
        s = self.num_rows
        if isinstance(layers, (int, np.integer)):
            g, j = self.where[int(layers)]
            rows = torch.as_tensor(slots, dtype=torch.int64, device=self.device).reshape(-1)
            return g, rows + j * s if j else rows
        lay = np.asarray(layers, dtype=np.int64).reshape(-1)
        where = np.asarray([self.where[i] for i in lay], dtype=np.int64).reshape(-1, 2)  # [r, (g, j)]
        if np.unique(where[:, 0]).shape[0] > 1:
            raise ValueError(f"layers {sorted(set(lay.tolist()))} differ in capacity: handle each capacity apart")
        host = np.asarray(slots, dtype=np.int64).reshape(-1)
        return int(where[0, 0]), torch.as_tensor(where[:, 1] * s + host, device=self.device)


class KVPool:
    """Preallocated per-layer KV storage for ``max_seqs`` sequences (see the module docstring for the layout)."""

    def __init__(self, capacities: Sequence[int], max_seqs: int, kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", with_scores: bool = False):
        if not capacities or any(not isinstance(c, int) or c < 1 for c in capacities):
            raise ValueError(f"capacities={list(capacities)!r} are out of range: one integer >= 1 per layer")
        for name, v in (("max_seqs", max_seqs), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is out of range: must be an integer >= 1")
        self.capacities = tuple(capacities)
        self.max_seqs, self.kv_heads, self.head_dim = max_seqs, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        rows = max_seqs + 1
        self.scratch = max_seqs  # the padding rows' slot
        f = dict(device=self.device)
        # the layers of one capacity share one buffer per field, [Lg, S, H, C(, D)]; each layer's tensor is a view
        # of it, so one compaction (or selection) covers every layer that evicts at a step
        self.stacks = LayerStacks(capacities, rows, self.device)
        self._key_stacks, self.keys = self.stacks.zeros(lambda c: (kv_heads, c, head_dim), dtype)
        self._value_stacks, self.values = self.stacks.zeros(lambda c: (kv_heads, c, head_dim), dtype)
        self._position_stacks, self.positions = self.stacks.zeros(lambda c: (kv_heads, c), torch.int32)
        self._score_stacks, scores = (self.stacks.zeros(lambda c: (kv_heads, c), torch.float32) if with_scores
                                      else ([], []))
        self.scores = scores if with_scores else None
        self.lengths = torch.zeros((len(capacities), rows, kv_heads), dtype=torch.int32, **f)  # [L, S, H]
        self.seen = torch.zeros(rows, dtype=torch.int64, **f)  # [S]
        # host mirror (numpy, so a step's checks are array operations): per layer and slot the heads' fill count;
        # tokens seen per slot
        self.host_lengths = np.zeros((len(capacities), rows), dtype=np.int64)  # [L, S]
        self.host_seen = np.zeros(rows, dtype=np.int64)  # [S]
        self.host_capacities = np.asarray(self.capacities, dtype=np.int64)  # [L]
        self.capacity_groups = self.stacks.groups  # [L]: the shared buffer of each layer
        self._free = list(range(max_seqs - 1, -1, -1))  # a stack: acquire() hands out slot 0 first
        self._used: set[int] = set()

    @classmethod
    def for_cache(cls, cache: Any, max_seqs: int, max_new_tokens: int) -> "KVPool":
        """A pool shaped after a prefilled ``SqueezeCache``: its plan's budgets, its ``evict_every`` as the chunk, its
        KV heads, head dim, dtype and device; scores when its policy scores."""
        if cache.plan is None or not cache.layers or not cache.layers[0].is_initialized:
            raise ValueError("prefill the cache before shaping a pool after it")
        if getattr(cache.layers[0], "method_name", None) == "kivi":
            raise ValueError("a KIVI cache needs quantised slots: squeezekv.runtime.pools.pool_for_cache (or "
                             "KiviPool.for_cache)")
        keys = cache.layers[0].keys  # [1, H, n, D]
        caps = pool_capacities(cache.plan, cache.evict_every, cache.evicts_while_decoding, max_new_tokens)
        return cls(caps, max_seqs, keys.shape[1], keys.shape[-1], dtype=keys.dtype, device=keys.device,
                   with_scores=cache.policy.uses_scores)

    @property
    def num_layers(self) -> int:
        return len(self.capacities)

    @property
    def with_scores(self) -> bool:
        return self.scores is not None

    # -- slots ----------------------------------------------------------------------------------------------------
    def free_slots(self) -> int:
        """Slots that :meth:`acquire` can still hand out."""
        return len(self._free)

    def acquire(self) -> int:
        """Take a free slot (empty: every length 0)."""
        if not self._free:
            raise ValueError(f"the pool's {self.max_seqs} slots are all in use: release one first")
        slot = self._free.pop()
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        """Give ``slot`` back (its lengths drop to 0; the storage stays allocated for the next sequence)."""
        self._check_slot(slot)
        self._used.discard(slot)
        self._clear(slot)
        self._free.append(slot)

    def in_use(self, slot: int) -> bool:
        return slot in self._used

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or slot not in self._used:
            raise ValueError(f"slot {slot!r} is not in use: acquire() one (slots 0..{self.max_seqs - 1})")

    def _clear(self, slot: int) -> None:
        self.lengths[:, slot].zero_()
        self.seen[slot] = 0
        self.host_lengths[:, slot] = 0
        self.host_seen[slot] = 0

    # -- admission ------------------------------------------------------------------------------------------------
    def admit(self, slot: int, cache: Any) -> None:
        """Copy a prefilled (and compressed) request, a ``SqueezeCache`` of batch 1 whose every layer is managed, into
        ``slot``: its keys/values, token positions and scores, in place (no reallocation; other slots untouched). A
        full cache (transformers' ``DynamicCache`` of ``DynamicLayer`` s, every token at its position) is admitted
        too, for a runtime that does not evict (policy ``none``)."""
        from transformers.cache_utils import DynamicLayer

        from ..cache import SqueezeLayer

        self._check_slot(slot)
        layers = list(cache.layers)
        if len(layers) != self.num_layers:
            raise ValueError(f"the cache has {len(layers)} layers but the pool {self.num_layers}")
        for i, layer in enumerate(layers):
            if type(layer) not in (SqueezeLayer, DynamicLayer):
                raise ValueError(f"layer {i} is a {type(layer).__name__}: the pool admits plain SqueezeLayers "
                                 "(no channel or cross-layer method, every layer managed) or a full DynamicCache")
            if not layer.is_initialized or not getattr(layer, "prefill_done", True) or layer.keys.dim() != 4:
                raise ValueError(f"layer {i} holds no prefilled prompt: prefill the request before admitting it")
            b, h, n, d = layer.keys.shape
            if b != 1:
                raise ValueError(f"layer {i} holds a batch of {b}: admit one request (batch 1) at a time")
            if getattr(layer, "valid", None) is not None:
                raise ValueError(f"layer {i} holds padding: prefill the request without padding")
            if (h, d, layer.values.shape[-1]) != (self.kv_heads, self.head_dim, self.head_dim):
                raise ValueError(f"layer {i} has {h} KV heads of dims {d}/{layer.values.shape[-1]}; the pool "
                                 f"{self.kv_heads} heads of dim {self.head_dim}")
            if n > self.capacities[i]:
                raise ValueError(f"layer {i} holds {n} tokens, more than its pool capacity {self.capacities[i]}")
        for i, layer in enumerate(layers):
            n = layer.keys.shape[2]
            self.keys[i][slot, :, :n].copy_(layer.keys[0])  # [H, n, D]
            self.values[i][slot, :, :n].copy_(layer.values[0])
            if isinstance(layer, SqueezeLayer):
                self.positions[i][slot, :, :n].copy_(layer.token_idx[0])  # [H, n]
            else:  # a full cache: token j at position j
                self.positions[i][slot, :, :n].copy_(torch.arange(n, device=self.device, dtype=torch.int32))
            if self.scores is not None:
                if getattr(layer, "scores", None) is None:
                    self.scores[i][slot, :, :n].zero_()
                else:
                    self.scores[i][slot, :, :n].copy_(layer.scores[0])
            self.lengths[i, slot].fill_(n)
            self.host_lengths[i][slot] = n
        seen = getattr(layers[0], "seen", layers[0].keys.shape[2])
        self.seen[slot] = seen
        self.host_seen[slot] = seen

    def export(self, slot: int, cache: Any) -> None:
        """Write ``slot``'s state back into ``cache``, the batch-1 ``SqueezeCache`` that was admitted into it (the
        inverse of :meth:`admit`): every layer's entries in temporal order (keys, values, ``token_idx``, scores) and
        the tokens seen, as the eager path would hold them after the same steps -- so the request can be saved to
        the store, or go on decoding on the eager path."""
        from transformers.cache_utils import DynamicLayer

        from ..cache import SqueezeLayer

        self._check_slot(slot)
        layers = list(cache.layers)
        if len(layers) != self.num_layers or any(type(x) not in (SqueezeLayer, DynamicLayer) for x in layers):
            raise ValueError(f"export into the plain {self.num_layers}-layer SqueezeCache (or full DynamicCache) the "
                             "slot was admitted from")
        seen = int(self.host_seen[slot])
        for i, layer in enumerate(layers):
            n = int(self.host_lengths[i][slot])
            order, pos = self.temporal_order(i, [slot], n)  # [1, H, n] each

            def rows(t: torch.Tensor) -> torch.Tensor:  # [S, H, C(, D)] -> [1, H, n(, D)] in temporal order
                row = t[slot:slot + 1, :, :n]
                at = order if row.dim() == 3 else order[..., None].expand(-1, -1, -1, row.shape[-1])
                return row.gather(2, at)

            layer.keys, layer.values = rows(self.keys[i]), rows(self.values[i])
            if not isinstance(layer, SqueezeLayer):
                continue  # a full cache holds keys and values only
            layer.token_idx = pos.to(torch.int32)
            if layer.scores is not None:
                layer.scores = (rows(self.scores[i]) if self.scores is not None
                                else layer.scores.new_zeros(pos.shape))
            layer._buffers = {}
            layer.seen = seen
            layer.compressed = layer.compressed or n < seen

    # -- after a decode step / eviction ---------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
              backend: str = "auto") -> torch.Tensor:
        """Append one new entry per (row, KV head) to ``layer`` of the rows' slots, inside a decode step (tensor ops
        only, capturable): ``key_states``/``value_states`` ``[B, H, 1, D]`` go to entry ``lengths[layer, slots[b], h]``
        with logical position ``seen[slots[b]]`` (and a zero score). Returns the lengths after the write ``[B, H]``
        int32 (the pool's own lengths grow in :meth:`advance`, after the whole step). ``backend``: ``"triton"`` (one
        kernel launch, :func:`~squeezekv.runtime.decode_triton.pool_write`), ``"torch"`` (indexing), ``"auto"``
        (the kernel on CUDA when triton is importable)."""
        b, h, t, d = key_states.shape
        if t != 1 or h != self.kv_heads or d != self.head_dim or value_states.shape != key_states.shape:
            raise ValueError(f"key/value states {tuple(key_states.shape)}/{tuple(value_states.shape)} must be "
                             f"[B, {self.kv_heads}, 1, {self.head_dim}] alike")
        if slots.shape != (b,):
            raise ValueError(f"slots {tuple(slots.shape)} must be [B={b}]")
        lengths = self.lengths[layer]  # [S, H]
        scores = None if self.scores is None else self.scores[layer]
        if backend == "triton" or (backend == "auto" and key_states.is_cuda and _triton_available()):
            from .ops import pool_write

            return pool_write(key_states, value_states, self.keys[layer], self.values[layer], self.positions[layer],
                              scores, lengths, self.seen, slots)
        lens = lengths.index_select(0, slots)  # [B, H] int32: where the new entries go
        heads = torch.arange(h, device=slots.device)
        at = (slots[:, None].expand(b, h), heads[None, :].expand(b, h), lens.long())
        self.keys[layer].index_put_(at, key_states[:, :, 0])  # [B, H, D]
        self.values[layer].index_put_(at, value_states[:, :, 0])
        pos = self.seen.index_select(0, slots).to(torch.int32)  # [B]: logical position of the new token
        self.positions[layer].index_put_(at, pos[:, None].expand(b, h))
        if scores is not None:
            scores.index_put_(at, torch.zeros((), device=pos.device))
        return lens + 1

    def write_chunk(self, layer: int, slot: torch.Tensor, n: torch.Tensor, key_states: torch.Tensor,
                    value_states: torch.Tensor) -> None:
        """Append a prefill chunk to ``layer`` of one slot, inside a mixed step (tensor ops only, capturable):
        ``key_states``/``value_states`` ``[H, C, D]``, of which the first ``n`` (``[1]`` int64, on the device) are
        real, go to entries ``lengths[layer, slot] + j`` with positions ``seen[slot] + j``; the padding tokens past
        ``n`` go to the scratch row's entries ``j`` (``C`` is at most the smallest capacity). Every head of the
        slot holds the same number of entries (a slot of a runtime that does not evict). The lengths grow in
        :meth:`advance_chunk`, after the step."""
        h, c, d = key_states.shape
        if h != self.kv_heads or d != self.head_dim or value_states.shape != key_states.shape:
            raise ValueError(f"chunk key/value states {tuple(key_states.shape)}/{tuple(value_states.shape)} must be "
                             f"[{self.kv_heads}, C, {self.head_dim}] alike")
        if c > min(self.capacities):
            raise ValueError(f"a chunk of {c} tokens exceeds the smallest layer capacity {min(self.capacities)}")
        j = torch.arange(c, device=slot.device)  # [C]
        real = j < n  # [C]
        start = self.lengths[layer].index_select(0, slot)[0, 0].long()  # entries held before the chunk
        rows = torch.where(real, slot, self.scratch)  # [C]
        entries = torch.where(real, start + j, j)  # [C]
        heads = torch.arange(h, device=slot.device)
        at = (rows[:, None].expand(c, h), heads[None, :].expand(c, h), entries[:, None].expand(c, h))
        self.keys[layer].index_put_(at, key_states.transpose(0, 1))  # [C, H, D]
        self.values[layer].index_put_(at, value_states.transpose(0, 1))
        pos = (self.seen.index_select(0, slot) + j).to(torch.int32)  # [C]: logical positions
        self.positions[layer].index_put_(at, pos[:, None].expand(c, h))
        if self.scores is not None:
            self.scores[layer].index_put_(at, torch.zeros((), device=slot.device))

    def advance_chunk(self, slot: torch.Tensor, n: torch.Tensor) -> None:
        """Device side of a mixed step's chunk: every layer of ``slot`` (``[1]``) holds ``n`` (``[1]``) more entries
        and has seen ``n`` more tokens (call before :meth:`advance`, which resets the scratch row)."""
        self.lengths[:, slot] += n.to(torch.int32)
        self.seen[slot] += n

    def advance(self, slots: torch.Tensor) -> None:
        """Device side of a decode step over the rows ``slots`` ``[B]`` (tensor ops only, captured with the step):
        every layer's lengths and ``seen`` grow by one; the scratch row stays empty."""
        self.lengths[:, slots] += 1  # [L, B, H]; duplicate scratch rows write the same value
        self.seen[slots] += 1
        self.lengths[:, self.scratch].zero_()  # views, zeroed on the device (no host value: capturable)
        self.seen[self.scratch:self.scratch + 1].zero_()

    def check_room(self, slots: np.ndarray) -> None:
        """Raise before a decode step of ``slots`` (distinct, host integers) that a layer of one has no room for."""
        full = self.host_lengths[:, slots] + 1 > self.host_capacities[:, None]  # [L, n]
        if full.any():
            i, j = (int(x[0]) for x in np.nonzero(full))
            raise ValueError(f"slot {int(slots[j])} is full in layer {i} ({self.capacities[i]} entries): its policy "
                             "does not evict while decoding; build the pool for more new tokens")

    def after_step(self, slots: np.ndarray) -> None:
        """Host-driven work after a decode step of ``slots`` (and its evictions): none for a plain pool (a KIVI pool
        quantises its full residuals here)."""

    def advance_host(self, slots: Sequence[int] | np.ndarray) -> None:
        """Host mirror of :meth:`advance` for the real rows (distinct slots)."""
        self.host_lengths[:, slots] += 1
        self.host_seen[slots] += 1

    def keep_rows(self, layer: int | Sequence[int] | np.ndarray, slots: Sequence[int] | np.ndarray,
                  idx: torch.Tensor) -> None:
        """Keep the filled entries ``idx`` ``[r, H, k]`` (distinct, any order, on the pool's device) of each row and
        drop the others, in place: the buffers' addresses never change. A row is ``(layer, slots[i])`` (one layer)
        or ``(layer[i], slots[i])`` (layers of one capacity, e.g. every layer that evicts at a step: one compaction
        for all of them); every row must hold the same number ``n`` of entries and the pairs must be distinct.

        Hole filling: a kept entry at index ``< k`` stays where it is; each kept entry at index ``>= k`` moves into one
        of the dropped entries below ``k`` (the ``j``-th mover, ascending, into the ``j``-th hole). At most ``n - k``
        entries move per (row, head) -- the decode chunk, when a policy evicts ``budget + chunk`` down to ``budget``
        -- instead of a gather and copy of all ``k``. The entries of a slot are then no longer in temporal order: the
        decode attention does not depend on their order, and :meth:`temporal_order` sorts them by position for a
        policy's selection."""
        host = np.asarray(slots, dtype=np.int64).reshape(-1)  # [r]
        lay = np.broadcast_to(np.asarray(layer, dtype=np.int64), host.shape)  # [r]
        r, h, k = idx.shape
        if r != host.shape[0] or h != self.kv_heads or r == 0:
            raise ValueError(f"idx {tuple(idx.shape)} must be [{host.shape[0]} rows, {self.kv_heads} heads, k]")
        held = np.unique(self.host_lengths[lay, host])
        if held.shape[0] != 1:
            raise ValueError(f"slots {host.tolist()} hold {held.tolist()} entries in layers {sorted(set(lay.tolist()))}"
                             ": keep rows that hold the same number at once")
        n = int(held[0])
        if k > n:
            raise ValueError(f"cannot keep {k} of the {n} entries that slots {host.tolist()} hold")
        p = n - k  # entries dropped per (row, head): holes below k and movers at or above k, as many of each
        g, rows = self.stacks.rows(int(layer) if isinstance(layer, (int, np.integer)) else lay, host)
        if p > 0:
            dev = self.device
            idx = idx.long()
            kept = torch.zeros((r, h, n), dtype=torch.bool, device=dev)
            kept.scatter_(2, idx, True)  # [r, H, n]
            spare = (k + torch.arange(p + 1, device=dev)).clamp_(max=n - 1).expand(r, h, p + 1)  # [r, H, p + 1]
            # j-th hole below k -> column j of dst; j-th kept entry at or above k -> column j of src; columns past
            # the (row, head)'s count stay spare self-copies of dropped entries (harmless: past the new length);
            # column p is where everything else goes, and is cut
            def ranked(mask: torch.Tensor, first: int) -> torch.Tensor:  # [r, H, w] -> [r, H, p]
                """The entry indices ``first + i`` where ``mask`` is set, ascending, in the first columns."""
                at = torch.where(mask, mask.long().cumsum(2) - 1, p)
                entries = torch.arange(first, first + mask.shape[2], device=dev).expand(mask.shape)
                return spare.clone().scatter_(2, at, entries)[:, :, :p]

            dst = ranked(~kept[:, :, :k], 0)  # the holes below k
            src = ranked(kept[:, :, k:], k)  # the kept entries at or above k
            cap = self._key_stacks[g].shape[3]
            base = (rows[:, None] * h + torch.arange(h, device=dev)) * cap  # [r, H]
            src_flat = (base[:, :, None] + src).reshape(-1)  # [r * H * p] into the flattened [Lg * S * H * C]
            dst_flat = (base[:, :, None] + dst).reshape(-1)
            for stacks, width in ((self._key_stacks, self.head_dim), (self._value_stacks, self.head_dim),
                                  (self._position_stacks, 1), (self._score_stacks, 1)):
                if stacks:
                    flat = stacks[g].view(-1, width)  # [Lg * S * H * C, D or 1]
                    flat.index_copy_(0, dst_flat, flat.index_select(0, src_flat))
        self._set_lengths(lay, host, k)

    def _set_lengths(self, lay: np.ndarray, slots: np.ndarray, n: int) -> torch.Tensor:
        """Every head of the rows ``(lay[i], slots[i])`` holds ``n`` entries now (device and host); returns the rows'
        indices into the ``[L * S]`` rows of the per-(layer, slot) tensors."""
        rows = torch.as_tensor(lay * (self.max_seqs + 1) + slots, device=self.device)  # into [L * S]
        self.lengths.view(-1, self.kv_heads).index_fill_(0, rows, n)
        self.host_lengths[lay, slots] = n
        return rows

    def temporal_order(self, layer: int | Sequence[int] | np.ndarray, slots: Sequence[int] | np.ndarray | torch.Tensor,
                       n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` entries of the rows ``(layer, slots[i])`` (or ``(layer[i], slots[i])``, layers of one
        capacity) in temporal order: ``(order, positions)``, both ``[r, H, n]`` (``order[..., j]``: the entry holding
        the ``j``-th oldest kept token; ``positions``: the sorted logical positions, what the eager path's
        ``token_idx`` holds)."""
        g, rows = self.stacks.rows(layer, slots)
        stack = self._position_stacks[g]
        pos = stack.view(-1, *stack.shape[2:]).index_select(0, rows)[:, :, :n]  # [r, H, n]
        sorted_pos, order = pos.sort(dim=-1)  # positions of one sequence are distinct
        return order, sorted_pos

    def stacked_scores(self, layer: int | Sequence[int] | np.ndarray, slots: Sequence[int] | np.ndarray | torch.Tensor,
                       n: int) -> torch.Tensor:
        """Scores ``[r, H, n]`` of the first ``n`` entries of the rows (as :meth:`temporal_order`), in entry order."""
        if self.scores is None:
            raise ValueError("the pool keeps no scores (with_scores=False)")
        g, rows = self.stacks.rows(layer, slots)
        stack = self._score_stacks[g]
        return stack.view(-1, *stack.shape[2:]).index_select(0, rows)[:, :, :n]

    # -- memory ---------------------------------------------------------------------------------------------------
    @staticmethod
    def bytes_per_slot(capacities: Sequence[int], kv_heads: int, head_dim: int, dtype: torch.dtype,
                       with_scores: bool = False) -> int:
        """Bytes one slot of a pool of these shapes takes: per layer ``H * C_l * (2 * D * itemsize + 4 [+ 4 for
        scores])``, plus its lengths (``L * H * 4``) and ``seen`` (8) -- what admission by memory divides by."""
        item = torch.empty((), dtype=dtype).element_size()
        per_entry = 2 * head_dim * item + 4 + (4 if with_scores else 0)
        return sum(kv_heads * c * per_entry for c in capacities) + len(capacities) * kv_heads * 4 + 8

    def slot_nbytes(self) -> int:
        """Bytes one slot takes (:meth:`bytes_per_slot` of this pool's shapes)."""
        return self.bytes_per_slot(self.capacities, self.kv_heads, self.head_dim, self.dtype, self.scores is not None)

    def nbytes(self) -> int:
        """Bytes allocated by the pool: ``(max_seqs + 1) * slot_nbytes()`` (the scratch row included)."""
        return (self.max_seqs + 1) * self.slot_nbytes()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the pool allocated."""
        out = [*self.keys, *self.values, *self.positions, self.lengths, self.seen]
        return out + (list(self.scores) if self.scores is not None else [])


#: whether triton is importable, decided once (a compiled step must not call the import machinery)
_TRITON = importlib.util.find_spec("triton") is not None


def _triton_available() -> bool:
    return _TRITON
