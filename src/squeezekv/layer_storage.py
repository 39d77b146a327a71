"""Where a compressed layer's held tokens live: :class:`LayerStorage`, the storage half of
:class:`squeezekv.SqueezeLayer`.

The storage knows tensors, not policies: it appends tokens in place into pre-allocated buffers, keeps (gathers and
compacts) a given set of held positions, counts its bytes, moves into fixed buffers for static (CUDA-graph) decoding
and back, and is filled from given keys/values. *Which* positions to keep, *when* to evict, how much room to reserve
and the masks are the layer's (:class:`squeezekv.SqueezeLayer`, which mixes this class in), as is everything that
reads the cache or its policy.

Tensors (``n`` = positions held, ``H`` = KV heads, ``D`` = head dim): ``keys``/``values`` ``[B, H, n, D]``,
``token_idx`` ``[B, H, n]`` int32 (index of each held token in the logical sequence, ascending), ``scores``
``[B, H, n]`` float32 (None unless the policy scores), ``valid`` ``[B, H, n]`` bool (False for padding; None when the
batch has no padding). ``seen`` counts the tokens seen (logical length), ``compressed`` is True once anything was
evicted (``token_idx`` is then no longer ``0..n-1``). Channel methods add their own per-token tensors
(:meth:`LayerStorage._tensors`) and override how keys/values are held.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch


def _allocated(t: torch.Tensor | None) -> int:
    """Bytes of the storage behind ``t`` (a view of a pre-allocated buffer counts the whole buffer)."""
    return 0 if t is None else t.untyped_storage().nbytes()


def allocated_nbytes(tensors: Iterable[Any], seen: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the storages behind ``tensors`` (anything not a tensor is skipped), each storage counted once: a view
    counts the whole buffer it lives in (transformers' sliding layer keeps a ``window - 1`` view of the prompt's
    tensor), and two views of one buffer count it once. ``seen``: storages already counted (shared across calls to
    count a whole cache)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = (str(storage.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


#: the per-position tensors a static (fixed-buffer) layer keeps in its buffers
STATIC_FIELDS = ("keys", "values", "token_idx", "scores")


class LayerStorage:
    """The held tokens of one layer (see the module docstring); mixed into :class:`squeezekv.SqueezeLayer` in front
    of transformers' ``CacheLayerMixin``."""

    #: the layer stores keys (False: values only, ``keys`` stays an empty ``[B, H, 0, D]`` tensor, e.g. a layer that
    #: reuses another layer's attention weights)
    stores_keys = True

    keys: torch.Tensor | None
    values: torch.Tensor | None

    def _clear_storage(self) -> None:
        """Hold nothing (the state before the first tokens arrive)."""
        self.keys = self.values = None
        self.token_idx: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.seen = 0
        self.compressed = False
        self._buffers: dict[str, torch.Tensor] = {}  # pre-allocated storage behind keys/values/token_idx/scores

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, with_scores: bool) -> None:
        """Empty tensors for the batch/head layout of ``key_states``/``value_states`` ``[B, H, q, D]``; ``scores``
        only ``with_scores``."""
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.token_idx = torch.empty((b, h, 0), dtype=torch.int32, device=self.device)
        if with_scores:
            self.scores = torch.empty((b, h, 0), dtype=torch.float32, device=self.device)

    @property
    def physical_length(self) -> int:
        """Positions held per (row, head)."""
        return 0 if self.keys is None else self.keys.shape[-2]

    # -- append ---------------------------------------------------------------------------------------------------
    def _append_tokens(self, key_states: torch.Tensor, value_states: torch.Tensor, reserve: int) -> None:
        """Append the ``q`` tokens after the ``seen`` ones: keys/values ``[B, H, q, D]``, their logical indices, zero
        scores; ``reserve`` free slots beyond them when a buffer has to move."""
        b, h, q, _ = key_states.shape
        new_idx = torch.arange(self.seen, self.seen + q, dtype=torch.int32, device=self.device)  # [q]
        self._append_kv(key_states, value_states, reserve)
        self._append("token_idx", new_idx.expand(b, h, q), reserve)
        if self.scores is not None:
            self._append("scores", self.scores.new_zeros((b, h, q)), reserve)
        self.valid = None  # recomputed from the padding mask by the attention function
        self.seen += q

    def _append_kv(self, key_states: torch.Tensor, value_states: torch.Tensor, reserve: int) -> None:
        """Store the new tokens' keys (unless the layer stores values only) and values."""
        if self.stores_keys:
            self._append("keys", key_states, reserve)
        self._append("values", value_states, reserve)

    def _append(self, name: str, new: torch.Tensor, reserve: int) -> None:
        """Append ``new`` along the sequence dim (2) of tensor ``name``, in place when its buffer has room; else
        move it to a buffer with ``reserve`` free slots. ``name`` stays a view of its buffer's used prefix."""
        cur = getattr(self, name)
        n, q = cur.shape[2], new.shape[2]
        buf = self._buffers.get(name)
        if buf is None or buf.shape[2] < n + q or buf.data_ptr() != cur.data_ptr():
            buf = cur.new_empty((*cur.shape[:2], n + q + reserve, *cur.shape[3:]))
            buf[:, :, :n].copy_(cur)
            self._buffers[name] = buf
        buf[:, :, n:n + q].copy_(new)
        setattr(self, name, buf[:, :, :n + q])

    # -- keep -----------------------------------------------------------------------------------------------------
    def keep(self, idx: torch.Tensor) -> None:
        """Keep the held positions ``idx`` ``[B, H, k]`` (ascending) of every per-position tensor; the rest is
        freed."""
        d_k, d_v = self.keys.shape[-1], self.values.shape[-1]
        if self.stores_keys:
            self.keys = self.keys.gather(2, idx[..., None].expand(-1, -1, -1, d_k)).contiguous()
        self.values = self.values.gather(2, idx[..., None].expand(-1, -1, -1, d_v)).contiguous()
        self.token_idx = self.token_idx.gather(2, idx)
        if self.scores is not None:
            self.scores = self.scores.gather(2, idx)
        if self.valid is not None:
            self.valid = self.valid.gather(2, idx)
        self._buffers = {}  # the old storage is released with the views into it
        self.compressed = True

    def flush(self) -> None:
        """Move held tokens to their compact storage once eviction is done (extension point: a quantised layer
        quantises its oldest full-precision tokens); nothing for a plain layer."""

    def _set_held(self, keys: torch.Tensor, values: torch.Tensor, token_idx: torch.Tensor,
                  scores: torch.Tensor | None, seen: int) -> None:
        """Hold exactly ``keys``/``values`` ``[B, H, n, D]`` at logical indices ``token_idx`` ``[B, H, n]`` int32
        (ascending, each ``< seen``) with ``scores`` ``[B, H, n]`` float32 (None: the layer keeps no scores), after
        ``seen`` tokens; no padding. The tensors are held as given (appends move them to new buffers)."""
        self.keys, self.values, self.token_idx, self.scores, self.valid = keys, values, token_idx, scores, None
        self._buffers = {}
        self.seen = seen
        n = token_idx.shape[-1]
        self.compressed = not (n == seen and bool((token_idx == torch.arange(n, device=token_idx.device)).all()))

    # -- read -----------------------------------------------------------------------------------------------------
    def value_blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The values of every held position in order, as ``(start, end, values [B, H, end - start, Dv])`` blocks
        (extension point: a quantised layer dequantises one block at a time); one block for a plain layer."""
        yield 0, self.values.shape[2], self.values

    def attention_keys(self) -> torch.Tensor:
        """The keys ``[B, H, n, Dk]`` the current attention computes its logits with (SnapKV scores with them)."""
        return self.keys

    # -- bytes ----------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes allocated for this layer: keys, values and bookkeeping (token indices, scores, padding), with any
        pre-allocated free slots."""
        return allocated_nbytes((self.keys, self.values, self.token_idx, self.scores, self.valid))

    def kv_nbytes(self) -> int:
        return allocated_nbytes((self.keys, self.values))

    # -- batch operations -----------------------------------------------------------------------------------------
    def _tensors(self) -> list[str]:
        """Names of every tensor indexed by batch row (what :meth:`_map` applies to)."""
        return ["keys", "values", "token_idx", "scores", "valid"]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._buffers = {}
        for name in self._tensors():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map(lambda t: t[indices, ...])

    # -- fixed buffers (static decoding) --------------------------------------------------------------------------
    def _into_fixed_buffers(self, capacity: int) -> None:
        """Move the held positions into buffers of ``capacity`` slots (the rest zeros, token index -1)."""
        n = self.physical_length
        b, h, _, d = self.keys.shape
        bufs = {  # zeros, not empty: a masked slot gets weight 0, and 0 * NaN from garbage memory would be NaN
            "keys": self.keys.new_zeros((b, h, capacity, d)),
            "values": self.values.new_zeros((b, h, capacity, self.values.shape[-1])),
            "token_idx": self.token_idx.new_full((b, h, capacity), -1),
        }
        if self.scores is not None:
            bufs["scores"] = self.scores.new_zeros((b, h, capacity))
        for name, buf in bufs.items():
            buf[:, :, :n].copy_(getattr(self, name))
            setattr(self, name, buf)
        self._buffers = {}

    def _write_slot(self, slot: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
                    position: torch.Tensor) -> None:
        """Write one token into slot ``slot`` (``[1]`` int64) of the fixed buffers: keys/values ``[B, H, 1, D]``,
        logical index ``position`` (``[1]``), zero score; tensor ops only (graph-capturable)."""
        b, h = key_states.shape[:2]
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self.token_idx.index_copy_(2, slot, position.to(torch.int32).view(1, 1, 1).expand(b, h, 1))
        if self.scores is not None:
            self.scores.index_fill_(2, slot, 0.0)
        self.valid = None

    def _fixed_buffers(self) -> dict[str, torch.Tensor | None]:
        """The fixed buffers of :data:`STATIC_FIELDS` (whole, as allocated)."""
        return {name: getattr(self, name) for name in STATIC_FIELDS}

    def _use_prefix(self, bufs: dict[str, torch.Tensor | None], n: int) -> None:
        """Hold the first ``n`` slots of the fixed buffers ``bufs`` (views)."""
        for name, buf in bufs.items():
            if buf is not None:
                setattr(self, name, buf[:, :, :n])

    def _compact_into(self, bufs: dict[str, torch.Tensor | None]) -> int:
        """Copy the held positions back to the front of the fixed buffers ``bufs`` (their addresses stay) and hold
        the whole buffers again; returns the positions held."""
        k = self.physical_length
        for name, buf in bufs.items():
            if buf is not None:
                buf[:, :, :k].copy_(getattr(self, name))
                setattr(self, name, buf)
        self._buffers = {}
        return k
