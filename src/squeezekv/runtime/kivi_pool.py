"""KIVI on the decode runtime: a :class:`~squeezekv.runtime.pool.KVPool` whose older tokens are stored as KIVI's packed
low-bit codes (:mod:`squeezekv.channel.kivi`) and whose newest tokens are the pool's full-precision entries.

Per layer ``l`` (``S`` slot rows, ``H`` KV heads, ``D`` head dim, ``G`` = ``group_size``, ``P = D * bits / 8``,
``Cq_l`` the layer's quantised capacity, a multiple of ``G``):

* the *residual*: the base pool's ``keys``/``values``/``positions`` ``[S, H, R + G, D]`` (``R`` = ``residual``),
  filled to ``lengths`` as in the plain pool; a decode step writes its token there;
* the quantised part: ``kcode``/``vcode`` ``[S, H, Cq_l, P]`` uint8, ``vscale``/``vzero`` ``[S, H, Cq_l, D / G]``,
  ``kscale``/``kzero`` ``[S, H, Cq_l / G, D]`` (one row per key group of ``G`` tokens, in storage order), in the
  model's dtype, filled to ``nq[l, slot]`` positions (the same in every head);
* ``nq`` ``[L, S]`` int32 on the device and ``host_nq`` its host mirror.

After a step, a layer of a slot whose residual holds ``R + G`` tokens *flushes*, outside the graph, as the eager
layer does (:meth:`squeezekv.channel.quantized.QuantizedLayer.flush`): its oldest ``G`` residual tokens are quantised
(keys per channel over the group, values per token over groups of ``G`` channels: :func:`squeezekv.channel.kivi.
quantize`, the same code as the eager path) and appended at ``nq``, and the residual moves down by ``G``. Every due
row of one quantised capacity flushes in one go (one quantisation, one scatter per field).

Decode attention (:meth:`KiviPool.attend`): on CUDA the fused KIVI kernels
(:func:`squeezekv.channel.kivi_triton.pool_decode_attend`: the quantised split-K programs read each slot's codes
through the batch's slot indices, dequantise in registers, and the last kernel merges the splits and attends to the
residual); elsewhere a PyTorch reference that dequantises the rows' codes.

Limits: policies that do not evict while decoding (``none``, ``snapkv``: the prompt is compressed before it is
quantised, as in the eager path), KIVI layers whose quantised tokens were never evicted (no group ids), keys and
values stored (no Shared Attention).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..channel.kivi import quantize
from ..channel.packing import pack, unpack
from .decode_attention import masked_decode
from .pool import KVPool, LayerStacks


class KiviPool(KVPool):
    """A pool of KIVI-quantised slots (layout in the module docstring). ``quant_capacities``: quantised positions per
    layer (multiples of ``group_size``); ``bits``/``group_size``/``residual``: the KIVI method's (2 or 4 bits)."""

    def __init__(self, quant_capacities: Sequence[int], max_seqs: int, kv_heads: int, head_dim: int, *,
                 bits: int = 2, group_size: int = 32, residual: int = 128, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if bits not in (2, 4):
            raise ValueError(f"bits={bits!r} is out of range: choose 2 or 4")
        if not isinstance(group_size, int) or group_size < 1 or head_dim % group_size or (head_dim * bits) % 8:
            raise ValueError(f"group_size={group_size!r} is out of range: an integer >= 1 dividing the head dim "
                             f"{head_dim}")
        if not isinstance(residual, int) or residual < 0:
            raise ValueError(f"residual={residual!r} is out of range: must be an integer >= 0")
        if not quant_capacities or any(not isinstance(c, int) or c < group_size or c % group_size
                                       for c in quant_capacities):
            raise ValueError(f"quant_capacities={list(quant_capacities)!r} are out of range: one multiple of "
                             f"group_size={group_size} (at least one group) per layer")
        super().__init__([residual + group_size] * len(quant_capacities), max_seqs, kv_heads, head_dim, dtype=dtype,
                         device=device, with_scores=False)
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.quant_capacities = tuple(quant_capacities)
        self.host_quant_capacities = np.asarray(self.quant_capacities, dtype=np.int64)  # [L]
        self.qstacks = LayerStacks(quant_capacities, max_seqs + 1, self.device)
        g, p = group_size, head_dim * bits // 8
        u8 = torch.uint8
        self._kcode, self.kcode = self.qstacks.zeros(lambda c: (kv_heads, c, p), u8)
        self._vcode, self.vcode = self.qstacks.zeros(lambda c: (kv_heads, c, p), u8)
        self._vscale, self.vscale = self.qstacks.zeros(lambda c: (kv_heads, c, head_dim // g), dtype)
        self._vzero, self.vzero = self.qstacks.zeros(lambda c: (kv_heads, c, head_dim // g), dtype)
        self._kscale, self.kscale = self.qstacks.zeros(lambda c: (kv_heads, c // g, head_dim), dtype)
        self._kzero, self.kzero = self.qstacks.zeros(lambda c: (kv_heads, c // g, head_dim), dtype)
        self.nq = torch.zeros((self.num_layers, max_seqs + 1), dtype=torch.int32, device=self.device)  # [L, S]
        self.host_nq = np.zeros((self.num_layers, max_seqs + 1), dtype=np.int64)  # [L, S]
        # per admitted slot, on the host: (tokens seen at admission, each layer's positions then [H, n0]); the
        # quantised part's positions follow from them (nothing is evicted while decoding), for :meth:`export`
        self._admitted: dict[int, tuple[int, list[torch.Tensor]]] = {}

    @staticmethod
    def bytes_per_kivi_slot(quant_capacities: Sequence[int], kv_heads: int, head_dim: int, dtype: torch.dtype, *,
                            bits: int, group_size: int, residual: int) -> int:
        """Bytes one slot of a KIVI pool of these shapes takes (what admission by memory divides by): the residual
        pool's (:meth:`KVPool.bytes_per_slot` of ``residual + group_size`` per layer) plus per layer
        ``H * (Cq * (2 * P + 2 * (D / G) * itemsize) + (Cq / G) * 2 * D * itemsize)`` and its count (4)."""
        item = torch.empty((), dtype=dtype).element_size()
        d, g = head_dim, group_size
        p = d * bits // 8
        quant = sum(kv_heads * (c * (2 * p + 2 * (d // g) * item) + (c // g) * 2 * d * item) for c in quant_capacities)
        base = KVPool.bytes_per_slot([residual + group_size] * len(quant_capacities), kv_heads, head_dim, dtype)
        return base + quant + len(quant_capacities) * 4

    @classmethod
    def for_cache(cls, cache: Any, max_seqs: int, max_new_tokens: int) -> "KiviPool":
        """A pool shaped after a prefilled KIVI ``SqueezeCache``: per layer room for the tokens it holds plus
        ``max_new_tokens``, rounded up to whole groups; its method's bits, group size and residual; its heads, head
        dim, dtype and device."""
        from ..channel.kivi import KIVILayer

        layers = list(cache.layers)
        if not layers or not all(isinstance(x, KIVILayer) and x.is_initialized for x in layers):
            raise ValueError("shape a KIVI pool after a prefilled cache whose every layer is a KIVI layer")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is out of range: must be an integer >= 0")
        first = layers[0]
        g = first.group_size
        caps = [max(g, -(-(x.physical_length + max_new_tokens) // g) * g) for x in layers]
        return cls(caps, max_seqs, first.values.shape[1], first.values.shape[-1], bits=first.bits, group_size=g,
                   residual=first.residual, dtype=first.values.dtype, device=first.values.device)

    # -- slots ----------------------------------------------------------------------------------------------------
    def _clear(self, slot: int) -> None:
        super()._clear(slot)
        self.nq[:, slot] = 0
        self.host_nq[:, slot] = 0
        self._admitted.pop(slot, None)

    def admit(self, slot: int, cache: Any) -> None:
        """Copy a prefilled KIVI request (batch 1, no padding, no group ids) into ``slot``: its codes, scales and
        zeros, and its full-precision residual with the residual's token positions."""
        from ..channel.kivi import KIVILayer

        self._check_slot(slot)
        layers = list(cache.layers)
        if len(layers) != self.num_layers:
            raise ValueError(f"the cache has {len(layers)} layers but the pool {self.num_layers}")
        g = self.group_size
        for i, layer in enumerate(layers):
            if not isinstance(layer, KIVILayer):
                raise ValueError(f"layer {i} is a {type(layer).__name__}: a KIVI pool admits KIVI layers")
            if (layer.bits, layer.group_size, layer.residual) != (self.bits, g, self.residual):
                raise ValueError(f"layer {i} quantises at {layer.bits} bits, groups of {layer.group_size}, residual "
                                 f"{layer.residual}; the pool {self.bits}/{g}/{self.residual}")
            if not layer.is_initialized or not layer.prefill_done:
                raise ValueError(f"layer {i} holds no prefilled prompt: prefill the request before admitting it")
            if not layer.stores_keys or layer.kgid is not None or layer.valid is not None:
                raise ValueError(f"layer {i} holds values only, evicted quantised tokens or padding: the KIVI pool "
                                 "admits a whole, unpadded KIVI layer")
            b, h, r, d = layer.values.shape
            if b != 1 or (h, d) != (self.kv_heads, self.head_dim):
                raise ValueError(f"layer {i} holds a batch of {b} with {h} KV heads of dim {d}: admit one request "
                                 f"(batch 1) of {self.kv_heads} heads of dim {self.head_dim}")
            if layer.nq > self.quant_capacities[i] or layer.nq % g or r >= self.residual + g:
                raise ValueError(f"layer {i} holds {layer.nq} quantised and {r} full-precision tokens; the pool "
                                 f"{self.quant_capacities[i]} and fewer than {self.residual + g}")
        for i, layer in enumerate(layers):
            nq, r = layer.nq, layer.residual_length
            for name in ("kcode", "vcode", "vscale", "vzero"):
                getattr(self, name)[i][slot, :, :nq].copy_(getattr(layer, name)[0, :, :nq])
            for name in ("kscale", "kzero"):
                getattr(self, name)[i][slot, :, :nq // g].copy_(getattr(layer, name)[0, :, :nq // g])
            self.keys[i][slot, :, :r].copy_(layer.keys[0])  # [H, r, D]
            self.values[i][slot, :, :r].copy_(layer.values[0])
            self.positions[i][slot, :, :r].copy_(layer.token_idx[0, :, nq:])
            self.lengths[i, slot].fill_(r)
            self.host_lengths[i][slot] = r
            self.nq[i, slot] = nq
            self.host_nq[i][slot] = nq
        seen = layers[0].seen
        self.seen[slot] = seen
        self.host_seen[slot] = seen
        self._admitted[slot] = (seen, [layer.token_idx[0].cpu() for layer in layers])

    def export(self, slot: int, cache: Any) -> None:
        """Write ``slot``'s state back into ``cache``, the batch-1 KIVI ``SqueezeCache`` admitted into it (the
        inverse of :meth:`admit`): per layer the quantised codes, scales and zeros (exactly the pool's bytes), the
        full-precision residual, every position (those held at admission, then one per decoded token) and the tokens
        seen, as the eager layer holds them after the same steps -- so the request can be saved to the store."""
        from ..channel.kivi import KIVILayer

        self._check_slot(slot)
        if slot not in self._admitted:
            raise ValueError(f"slot {slot} holds no admitted request")
        layers = list(cache.layers)
        if len(layers) != self.num_layers or not all(isinstance(x, KIVILayer) for x in layers):
            raise ValueError(f"export into the {self.num_layers}-layer KIVI SqueezeCache the slot was admitted from")
        seen0, held = self._admitted[slot]
        seen, g = int(self.host_seen[slot]), self.group_size
        for i, layer in enumerate(layers):
            nq, r = int(self.host_nq[i][slot]), int(self.host_lengths[i][slot])
            h = held[i].shape[0]
            new = torch.arange(seen0, seen, dtype=held[i].dtype).expand(h, -1)  # [H, seen - seen0]
            pos = torch.cat([held[i], new], dim=1)  # [H, n]: every token the slot holds, in temporal order
            if pos.shape[1] != nq + r:
                raise RuntimeError(f"layer {i} of slot {slot}: {nq} quantised + {r} residual entries, but "
                                   f"{pos.shape[1]} positions were held and decoded")
            for name in ("kcode", "vcode", "vscale", "vzero"):
                setattr(layer, name, getattr(self, name)[i][slot:slot + 1, :, :nq].clone())
            for name in ("kscale", "kzero"):
                setattr(layer, name, getattr(self, name)[i][slot:slot + 1, :, :nq // g].clone())
            layer.keys = self.keys[i][slot:slot + 1, :, :r].clone()  # [1, H, r, D]
            layer.values = self.values[i][slot:slot + 1, :, :r].clone()
            layer.token_idx = pos[None].to(device=self.device, dtype=torch.int32)  # [1, H, nq + r]
            if layer.scores is not None:
                layer.scores = layer.scores.new_zeros(layer.token_idx.shape)
            layer.nq = nq
            layer.seen = seen
            layer._buffers = {}
            if hasattr(layer, "_plan"):
                layer._plan = {}

    # -- decoding -------------------------------------------------------------------------------------------------
    def check_room(self, slots: np.ndarray) -> None:
        """Raise before a step that would need a flush into a full quantised part (``slots``: the step's)."""
        super().check_room(slots)
        flushing = self.host_lengths[:, slots] + 1 >= self.residual + self.group_size  # [L, n]
        over = flushing & (self.host_nq[:, slots] + self.group_size > self.host_quant_capacities[:, None])
        if over.any():
            i, j = (int(x[0]) for x in np.nonzero(over))
            raise ValueError(f"slot {int(slots[j])} is full in layer {i} ({self.quant_capacities[i]} quantised "
                             "positions): build the pool for more new tokens")

    def after_step(self, slots: np.ndarray) -> None:
        """Flush (quantise ``group_size`` tokens of) every layer of ``slots`` whose residual is full."""
        due = self.host_lengths[:, slots] >= self.residual + self.group_size  # [L, n]
        if not due.any():
            return
        lay, col = np.nonzero(due)
        rows_slots = slots[col]
        groups = self.qstacks.groups[lay]
        for q in np.unique(groups):
            sel = groups == q
            self._flush(lay[sel], rows_slots[sel])

    def _flush(self, lay: np.ndarray, slots: np.ndarray) -> None:
        """Quantise the oldest ``G`` residual tokens of the rows ``(lay[i], slots[i])`` (one quantised capacity, each
        residual holding ``R + G``) and append them at each row's ``nq``; the residual moves down by ``G``."""
        g, h, d, r = self.group_size, self.kv_heads, self.head_dim, self.residual
        m = lay.shape[0]
        dev = self.device
        g0, rrows = self.stacks.rows(lay, slots)  # the residual buffers (one capacity: R + G)
        kres = self._key_stacks[g0].view(-1, h, r + g, d).index_select(0, rrows)  # [m, H, R + G, D]
        vres = self._value_stacks[g0].view(-1, h, r + g, d).index_select(0, rrows)
        pres = self._position_stacks[g0].view(-1, h, r + g).index_select(0, rrows)  # [m, H, R + G]
        keys, values = kres[:, :, :g], vres[:, :, :g]  # [m, H, G, D]: the oldest G
        vc, vs, vz = quantize(values.reshape(m, h, g, d // g, g), self.bits, dim=4, store_dtype=self.dtype)
        kc, ks, kz = quantize(keys.reshape(m, h, 1, g, d), self.bits, dim=3, store_dtype=self.dtype)
        q, qrows = self.qstacks.rows(lay, slots)
        cq = self.qstacks.capacities[q]
        at = torch.as_tensor(self.host_nq[lay, slots], device=dev)  # [m]: where the group goes
        heads = qrows[:, None] * h + torch.arange(h, device=dev)  # [m, H]
        tok = (heads[:, :, None] * cq + at[:, None, None] + torch.arange(g, device=dev)).reshape(-1)  # [m * H * G]
        grp = (heads * (cq // g) + (at // g)[:, None]).reshape(-1)  # [m * H]
        for stacks, new in ((self._kcode, pack(kc.reshape(m, h, g, d), self.bits)),
                            (self._vcode, pack(vc.reshape(m, h, g, d), self.bits)),
                            (self._vscale, vs.reshape(m, h, g, d // g)), (self._vzero, vz.reshape(m, h, g, d // g))):
            stacks[q].view(-1, new.shape[-1]).index_copy_(0, tok, new.reshape(-1, new.shape[-1]))
        for stacks, new in ((self._kscale, ks), (self._kzero, kz)):
            stacks[q].view(-1, d).index_copy_(0, grp, new.reshape(-1, d))
        for stacks, old in ((self._key_stacks, kres), (self._value_stacks, vres), (self._position_stacks, pres)):
            stacks[g0].view(-1, *old.shape[1:]).index_copy_(0, rrows, old.roll(-g, dims=2))
        lrows = self._set_lengths(lay, slots, r)  # [m] into [L * S]
        self.nq.view(-1).index_add_(0, lrows, torch.full((m,), g, dtype=torch.int32, device=dev))
        self.host_nq[lay, slots] += g

    def attend(self, layer: int, query: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
               scale: float, ops: Any = None) -> torch.Tensor:
        """Decode attention of ``query`` ``[B, Hq, 1, D]`` over each row's quantised positions and residual (the
        first ``lengths`` ``[B, H]`` entries, the new token included): ``[B, Hq, 1, D]``. ``ops``: the runtime's
        custom-operator module (:mod:`squeezekv.runtime.ops`) to run the fused Triton kernels through (one opaque
        call in a compiled step), or None for the PyTorch reference."""
        b, hq, _, d = query.shape
        h = self.kv_heads
        if ops is None:
            return self.reference_attend(layer, query, slots, lengths, scale)
        out = ops.kivi_attention(query.reshape(b, h, hq // h, d), self.kcode[layer], self.vcode[layer],
                                 self.kscale[layer], self.kzero[layer], self.vscale[layer], self.vzero[layer], slots,
                                 self.nq[layer], self.keys[layer], self.values[layer], lengths, self.bits,
                                 self.group_size, float(scale))  # [B, H, G, D]
        return out.reshape(b, hq, 1, d)

    def reference_attend(self, layer: int, query: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """The PyTorch path of :meth:`attend`: the rows' codes dequantised (in the model's dtype, as the eager
        layer's reference), logits in the query's dtype, softmax and the value product in float32."""
        b, hq, _, d = query.shape
        h, g = self.kv_heads, self.group_size
        cq = self.quant_capacities[layer]
        dt = self.dtype
        kc = unpack(self.kcode[layer].index_select(0, slots), self.bits).to(dt)  # [B, H, Cq, D]
        vc = unpack(self.vcode[layer].index_select(0, slots), self.bits).to(dt)
        ks = self.kscale[layer].index_select(0, slots)[:, :, :, None]  # [B, H, Cq/G, 1, D]
        kz = self.kzero[layer].index_select(0, slots)[:, :, :, None]
        qkeys = (kc.view(b, h, cq // g, g, d) * ks + kz).view(b, h, cq, d)
        vs = self.vscale[layer].index_select(0, slots)[..., None]  # [B, H, Cq, D/G, 1]
        vz = self.vzero[layer].index_select(0, slots)[..., None]
        qvalues = (vc.view(b, h, cq, d // g, g) * vs + vz).view(b, h, cq, d)
        keys = torch.cat([qkeys, self.keys[layer].index_select(0, slots)], dim=2)  # [B, H, Cq + R + G, D]
        values = torch.cat([qvalues, self.values[layer].index_select(0, slots)], dim=2)
        nq = self.nq[layer].index_select(0, slots)  # [B]
        c = self.capacities[layer]
        filled = torch.cat([torch.arange(cq, device=slots.device) < nq[:, None, None].expand(b, h, 1),
                            torch.arange(c, device=slots.device) < lengths[..., None]], dim=2)  # [B, H, Cq + C]
        return masked_decode(query, keys, values, filled, scale)[0]

    # -- memory ---------------------------------------------------------------------------------------------------
    def slot_nbytes(self) -> int:
        """Bytes one slot takes (:meth:`bytes_per_kivi_slot` of this pool's shapes)."""
        return self.bytes_per_kivi_slot(self.quant_capacities, self.kv_heads, self.head_dim, self.dtype,
                                        bits=self.bits, group_size=self.group_size, residual=self.residual)

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + [*self.kcode, *self.vcode, *self.vscale, *self.vzero, *self.kscale, *self.kzero,
                                    self.nq]
