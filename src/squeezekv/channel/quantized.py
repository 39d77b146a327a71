"""What the low-bit channel methods (KIVI, Coupled Quantization) share: a layer whose older tokens are stored as
packed low-bit codes and whose newest tokens stay in full precision.

Layout of a :class:`QuantizedLayer` (``n = nq + r`` positions per batch row and KV head, in temporal order):

* positions ``0 .. nq-1``: quantised, in the subclass's per-token tensors (:attr:`QuantizedLayer.token_fields`, token
  dimension 2) and tables (:attr:`QuantizedLayer.table_fields`, e.g. KIVI's per-channel key scales of a token group);
* positions ``nq .. n-1``: the *residual*, full-precision ``keys``/``values`` ``[B, H, r, D]`` (what
  :meth:`SqueezeLayer.update` appends to);
* ``token_idx``/``scores``/``valid`` ``[B, H, n]`` cover all positions, as in :class:`SqueezeLayer`, so every eviction
  policy sees the same per-token bookkeeping whatever the storage.

Order of operations (evict first, quantise the survivors): new tokens are appended to the residual, attend in full
precision, then :meth:`SqueezeLayer.after_attention` evicts per the plan, and only then :meth:`QuantizedLayer.flush`
quantises the oldest residual tokens, ``flush_block`` at a time, while more than ``residual + flush_block - 1`` are
held. A prompt is thus compressed by the eviction policy on exact keys/values before any of it is quantised.

Eviction during decoding (window, StreamingLLM, H2O) gathers the kept positions: per-token codes and scales are
gathered as they are (no requantisation); per-group tables (KIVI keys) are indexed through a per-token group id and
compacted (:meth:`QuantizedLayer._gather_quantised`). The quantised/residual split must be the same in every
(row, head); when a policy keeps more old tokens in one head than in another (H2O), the kept quantised positions beyond
the smallest count are *dequantised back into the residual* (no new information is lost) and quantised again when
the residual flushes.

Attention (:meth:`QuantizedLayer.attend`) takes the online-softmax state (running max and sum, as in
FlashAttention) of the quantised positions from :meth:`QuantizedLayer._quantised_state`, then merges the residual.
The PyTorch reference path of that method dequantises one block of keys/values at a time; the whole dequantised
cache is never materialised. A subclass may fuse it: KIVI's decoding steps on CUDA run a Triton kernel that
dequantises in registers (:mod:`squeezekv.channel.kivi_triton`).
Policies that need weights (H2O) get them from :meth:`QuantizedLayer.weight_chunks`, which dequantises the keys a
second time, block by block (cost: one more pass over the keys per step); SnapKV, which re-reads the keys on a prompt
chunk, gets them from :meth:`QuantizedLayer.attention_keys` (dequantised once per multi-token chunk, never per decoded
token).

Values only: a layer whose class says ``stores_keys = False`` (Shared Attention's shared layer mixed in front of the
method's layer, :meth:`squeezekv.channel.base.ChannelMethod.make_layer`) creates no key fields, quantises only its
values (``_encode(None, values)``) and exposes them block by block through :meth:`QuantizedLayer.value_blocks`.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Iterator

import torch

from .. import attention_math
from ..attention_math import causal
from ..cache import SqueezeLayer
from ..layer_storage import _allocated

#: largest dequantised block (elements of one of K or V) the attention materialises at once
BLOCK_ELEMS = 1 << 24
#: quantised positions reserved beyond the used ones when a decoding step flushes (amortises the appends)
QUANT_RESERVE = 128


class QuantizedLayer(SqueezeLayer):
    """A :class:`SqueezeLayer` whose positions ``0 .. nq-1`` are stored quantised (see the module docstring).

    Subclasses define :attr:`token_fields`/:attr:`table_fields`, create them in :meth:`_init_storage`, and implement
    :meth:`_encode` (quantise and append), :meth:`_dequant` (codes of some positions -> keys/values) and
    :meth:`_gather_quantised` (keep some quantised positions)."""

    token_fields: tuple[str, ...] = ()
    table_fields: tuple[str, ...] = ()
    supports_static = False  # the static path writes full-precision slots, never quantised ones

    def __init__(self, cache: Any, layer_idx: int, residual: int, flush_block: int):
        super().__init__(cache, layer_idx)
        self.residual = residual
        self.flush_block = flush_block
        self.nq = 0
        for name in self.token_fields + self.table_fields:
            setattr(self, name, None)

    # -- subclass hooks -----------------------------------------------------------------------------------------
    @abstractmethod
    def _init_storage(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Create the (empty) fields of :attr:`token_fields`/:attr:`table_fields` for this batch and head layout."""

    @abstractmethod
    def _encode(self, keys: torch.Tensor | None, values: torch.Tensor, reserve: int) -> None:
        """Quantise ``keys``/``values`` ``[B, H, m, D]`` (m a multiple of ``flush_block``, the oldest residual
        tokens) and append them after position ``nq - 1``; ``keys`` is None in a layer that stores values only
        (:attr:`SqueezeLayer.stores_keys` False: no key fields are created)."""

    @abstractmethod
    def _dequant(self, pos: slice | torch.Tensor, keys: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Keys and values ``[B, H, m, D]`` (model dtype) of quantised positions ``pos``: a slice, or indices
        ``[B, H, m]`` (each ``< nq``). Keys are None when ``keys`` is False or the layer stores values only."""

    @abstractmethod
    def _gather_quantised(self, idx: torch.Tensor) -> None:
        """Keep quantised positions ``idx`` ``[B, H, s]`` (ascending, each ``< nq``) and drop the others."""

    # -- storage ------------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype
        self._init_storage(key_states, value_states)

    @property
    def physical_length(self) -> int:
        return 0 if self.token_idx is None else self.token_idx.shape[-1]

    @property
    def residual_length(self) -> int:
        return 0 if self.values is None else self.values.shape[-2]

    def _tensors(self) -> list[str]:
        return super()._tensors() + list(self.token_fields) + list(self.table_fields)

    def _quant_tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, n) for n in self.token_fields + self.table_fields) if t is not None]

    def nbytes(self) -> int:
        """Bytes allocated: packed codes, scales/zeros, group ids, the full-precision residual and the per-token
        bookkeeping (token indices, scores, padding), with any reserved free slots."""
        return super().nbytes() + sum(_allocated(t) for t in self._quant_tensors())

    def kv_nbytes(self) -> int:
        return super().kv_nbytes() + sum(_allocated(t) for t in self._quant_tensors())

    def reset(self) -> None:
        super().reset()
        for name in self.token_fields + self.table_fields:
            setattr(self, name, None)
        self.nq = 0

    def _reserve(self, q: int) -> int:
        # the residual never holds more than residual + flush_block - 1 tokens after a step, and grows as a plain
        # layer does (SqueezeLayer._cap_reserve: never room for many more tokens than exist)
        if not self.prefill_done or q != 1:
            return 0
        want = self.residual + self.flush_block - 1 - self.residual_length - q
        return self._cap_reserve(want, self.residual_length + q, q)

    # -- quantise / evict ---------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Quantise the oldest residual tokens, ``flush_block`` at a time, while the residual holds at least
        ``residual + flush_block`` tokens."""
        r = self.residual_length
        m = (r - self.residual) // self.flush_block * self.flush_block
        if m <= 0:
            return
        # never room for more tokens than the model's context
        reserve = min(QUANT_RESERVE, max(0, self.cache.max_context - self.seen)) if m == self.flush_block else 0
        self._encode(self.keys[:, :, :m] if self.stores_keys else None, self.values[:, :, :m], reserve)
        self.nq += m
        # clone: the residual's old buffer (holding the quantised tokens in full precision) is released
        if self.stores_keys:
            self.keys = self.keys[:, :, m:].clone()
        self.values = self.values[:, :, m:].clone()
        self._buffers.pop("keys", None)
        self._buffers.pop("values", None)

    def after_attention(self, q_len: int) -> None:
        super().after_attention(q_len)
        if self.cache.plan is not None:  # else the plan still waits for every layer: eviction comes first
            self.flush()

    def compress(self, budget: int) -> None:
        """Evict down to ``budget`` positions (the policy decides, as for a plain layer), then quantise."""
        super().compress(budget)
        self.flush()

    def keep(self, idx: torch.Tensor) -> None:
        """Keep held positions ``idx`` ``[B, H, k]`` (ascending): quantised and residual parts alike."""
        nq, d_k, d_v = self.nq, self.keys.shape[-1], self.values.shape[-1]
        kept_q = (idx < nq).sum(-1)  # [B, H] quantised positions each (row, head) keeps
        s = int(kept_q.min()) if nq else 0
        ridx = idx[..., s:]  # [B, H, k - s]: these become the residual
        rpos = (ridx - nq).clamp(min=0)
        keys = self.keys.gather(2, rpos[..., None].expand(-1, -1, -1, d_k)) if self.stores_keys else self.keys
        values = self.values.gather(2, rpos[..., None].expand(-1, -1, -1, d_v))
        if nq and int(kept_q.max()) > s:
            # some heads keep more quantised positions than others: those move to the residual, dequantised
            from_q = (ridx < nq)[..., None]  # [B, H, k - s, 1]
            dk, dv = self._dequant(ridx.clamp(max=nq - 1), keys=self.stores_keys)
            if self.stores_keys:
                keys = torch.where(from_q, dk.to(keys.dtype), keys)
            values = torch.where(from_q, dv.to(values.dtype), values)
        if nq:
            self._gather_quantised(idx[..., :s])
        self.nq = s
        self.keys, self.values = keys, values
        self.token_idx = self.token_idx.gather(2, idx)
        if self.scores is not None:
            self.scores = self.scores.gather(2, idx)
        if self.valid is not None:
            self.valid = self.valid.gather(2, idx)
        self._buffers = {}
        self.compressed = True

    # -- attention ----------------------------------------------------------------------------------------------
    def attention_keys(self) -> torch.Tensor:
        """Keys of every held position ``[B, H, n, D]`` (a dequantised copy of the quantised part)."""
        if self.nq == 0:
            return self.keys
        return torch.cat([self._dequant(slice(0, self.nq))[0].to(self.keys.dtype), self.keys], dim=2)

    def _blocks(self, query: torch.Tensor) -> Iterator[tuple[int, int]]:
        b, hq, q, d = query.shape
        h = self.keys.shape[1]
        # a block bounds both the dequantised keys [B, H, m, D] and the logits [B, Hq, q, m]; whole flush blocks
        step = max(1, BLOCK_ELEMS // max(1, b * h * d, b * hq * q))
        step = max(self.flush_block, step // self.flush_block * self.flush_block)
        for start in range(0, self.nq, step):
            yield start, min(self.nq, start + step)

    def _mask(self, allowed: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
        """``allowed`` as ``[B|1, H|1, 1, q, n]`` (broadcast over the query heads of a group); for ``allowed`` None
        (contiguous layout) the causal mask of the ``q`` newest positions, or None for one query (sees all)."""
        if allowed is not None:
            return allowed[:, :, None]
        if q_len == 1:
            return None
        return causal(q_len, self.physical_length, self.keys.device)  # [q, n]: the new queries are the last q

    def value_blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Values of every held position: quantised ones dequantised ``flush_block``-aligned blocks at a time (each
        at most :data:`BLOCK_ELEMS` elements), then the residual."""
        b, h, _, dv = self.values.shape
        step = max(1, BLOCK_ELEMS // max(1, b * h * dv))
        step = max(self.flush_block, step // self.flush_block * self.flush_block)
        for start in range(0, self.nq, step):
            end = min(self.nq, start + step)
            yield start, end, self._dequant(slice(start, end), keys=False)[1]
        yield self.nq, self.physical_length, self.values

    def _logits(self, qg: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        # qg: [B, H, G, q, D], keys: [B, H, m, D] -> float32 [B, H, G, q, m]
        logits = torch.einsum("bhgqd,bhnd->bhgqn", qg, keys.to(qg.dtype)).float() * scaling
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return logits

    def _merge(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], qg: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, mask: torch.Tensor | None, scaling: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Online-softmax step: the running ``(max [B, H, G, q], sum [B, H, G, q], acc [B, H, G, q, Dv])`` (float32)
        after also attending to ``keys``/``values`` ``[B, H, m, D]``."""
        run_max, run_sum, acc = state
        logits = self._logits(qg, keys, mask, scaling)  # [B, H, G, q, m]
        new_max = torch.maximum(run_max, logits.amax(dim=-1))
        safe = new_max.masked_fill(new_max == float("-inf"), 0.0)  # rows that saw nothing yet
        p = torch.exp(logits - safe[..., None])
        corr = torch.exp(run_max - safe)
        run_sum = run_sum * corr + p.sum(dim=-1)
        acc = acc * corr[..., None] + torch.einsum("bhgqn,bhnd->bhgqd", p.to(values.dtype), values).float()
        return new_max, run_sum, acc

    def _quantised_state(self, qg: torch.Tensor, mask: torch.Tensor | None, scaling: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Online-softmax state ``(max [B, H, G, q], sum [B, H, G, q], acc [B, H, G, q, Dv])`` (float32) of the
        queries ``qg`` ``[B, H, G, q, D]`` over the quantised positions ``0 .. nq-1`` (``mask``: their columns of
        :meth:`_mask`, or None). The PyTorch reference: one dequantised block at a time (a subclass may fuse it)."""
        b, h, g, q_len, _ = qg.shape
        run_max = qg.new_full((b, h, g, q_len), float("-inf"), dtype=torch.float32)
        state = (run_max, torch.zeros_like(run_max),
                 qg.new_zeros((b, h, g, q_len, self.values.shape[-1]), dtype=torch.float32))
        for start, end in self._blocks(qg.reshape(b, h * g, q_len, -1)):
            kb, vb = self._dequant(slice(start, end))  # [B, H, m, D]
            state = self._merge(state, qg, kb, vb, None if mask is None else mask[..., start:end], scaling)
        return state

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None, scaling: float
    ) -> torch.Tensor:
        """Attention of ``query`` ``[B, Hq, q, D]`` over every held position: the quantised part's online-softmax
        state (:meth:`_quantised_state`), then the residual merged into it. Returns ``[B, Hq, q, Dv]``."""
        if self.nq == 0:
            return super().attend(query, self.keys, self.values, allowed, scaling)
        b, hq, q_len, d = query.shape
        h = self.keys.shape[1]
        qg = query.reshape(b, h, hq // h, q_len, d)  # query heads of one KV head side by side
        mask = self._mask(allowed, q_len)
        state = self._quantised_state(qg, None if mask is None else mask[..., :self.nq], scaling)
        _, run_sum, acc = self._merge(state, qg, self.keys, self.values,
                                      None if mask is None else mask[..., self.nq:], scaling)
        out = acc / run_sum[..., None]
        return out.reshape(b, hq, q_len, -1).to(query.dtype)

    def weight_chunks(
        self, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None, scaling: float
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Softmaxed weights ``(start, end, [B, H, G, end - start, n])`` of chunks of queries over every held
        position, the quantised keys dequantised block by block (for policies that observe weights, e.g. H2O)."""
        if self.nq == 0:
            yield from super().weight_chunks(query, self.keys, allowed, scaling)
            return
        b, hq, q_len, d = query.shape
        h = self.keys.shape[1]
        qg = query.reshape(b, h, hq // h, q_len, d)
        chunk = max(1, attention_math.EAGER_BLOCK // max(1, b * hq * self.physical_length))
        mask = self._mask(allowed, q_len)
        for start in range(0, q_len, chunk):
            end = min(q_len, start + chunk)
            sub = None if mask is None else mask[..., start:end, :]  # [.., q_chunk, n]
            qc = qg[:, :, :, start:end]
            parts = [self._logits(qc, self._dequant(slice(s0, s1))[0], None if sub is None else sub[..., s0:s1],
                                  scaling) for s0, s1 in self._blocks(query)]
            parts.append(self._logits(qc, self.keys, None if sub is None else sub[..., self.nq:], scaling))
            yield start, end, torch.cat(parts, dim=-1).softmax(dim=-1)
