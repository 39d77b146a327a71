"""Fused dequantise-in-attention for KIVI decoding: Triton kernels that attend one query token over the packed
low-bit codes of :class:`squeezekv.channel.kivi.KIVILayer` (and its full-precision residual) without writing any
dequantised key or value to memory.

Flash-decoding layout (split-K): the grid is ``(B * H, S)``; program ``(bh, s)`` walks the quantised positions
``[s * L, min((s + 1) * L, nq))`` of one (row, KV head) in blocks of ``BLOCK_N`` tokens. For each block it loads the
packed key/value bytes once (``[BLOCK_N, D * bits / 8]`` uint8), unpacks the ``8 / bits`` codes of each byte in
registers (code ``i`` of a byte at bit offset ``bits * i``, as :mod:`squeezekv.channel.packing` writes it),
dequantises keys with their group's per-channel scale/zero (group ``p // group_size``, or ``kgid[b, h, p]`` after an
eviction) and values with their own per-channel-group scale/zero, and computes the logits of the ``G = Hq / H`` query
heads of that KV head together (``tl.dot`` with the query heads padded to 16 rows), so the codes are read once per KV
head. An online softmax (running max and sum, float32) accumulates ``P V``; each program writes its partial
``(max, sum, acc)`` in float32.

Launch settings come from a :class:`~squeezekv.channel.kernels.KiviKernelConfig` (argument ``config``; default
:data:`DEFAULT_CONFIG`): split-kernel variant, tokens per block, warps, programs per multiprocessor. Three split
kernels (``config.variant``, picked per call by :func:`choose_variant`; the launch arguments of a shape are cached,
:func:`_launch_config`, and a caller may keep a ``plan`` dict to skip the stride work between flushes):

* ``"interleaved"``: the codes of a byte row are interleaved back into channel order (``[BLOCK_N, D / PER, PER]`` ->
  ``[BLOCK_N, D]``, ``PER = 8 / bits``) and one ``tl.dot`` over ``D`` computes the logits (one over the block for
  ``P V``); key scale rows are loaded once per group and repeated over its tokens when a block holds whole groups.
* ``"planes"``: bit plane ``i`` of the bytes holds channels ``j * PER + i``; each plane is its own operand
  ``[BLOCK_N, D / PER]`` (the query loaded with the same channel stride), the logits are the sum of ``PER`` dots over
  ``D / PER`` channels and ``P V`` is ``PER`` dots into ``PER`` accumulators stored back at channel ``j * PER + i``.
  The unpacked codes never change layout (no reshape), a block of ``BLOCK_N <= group_size`` tokens within one key
  group loads one scale/zero row per plane, and the value scales/zeros of a token are one tile for all planes
  (channel ``j * PER + i`` lies in group ``j // (group_size / PER)``). It needs ``D * bits / 8 >= 16`` and
  ``group_size`` a multiple of ``PER`` (else ``"interleaved"`` runs).
* ``"planes_fma"``: the ``"planes"`` kernel with the products as broadcast multiplies and float32 reductions on the
  CUDA cores instead of ``tl.dot`` (the query heads padded only to a power of two, not to 16 rows; no operand goes
  through shared memory); any ``D`` whose codes fill bytes.

The splits are merged by a second small kernel: :func:`decode_state` returns the running state
``(max [B, H, G], sum [B, H, G], acc [B, H, G, Dv])`` (the state :meth:`QuantizedLayer._quantised_state` defines, for
callers that merge more positions themselves); :func:`decode_attend` (what a KIVI decoding step uses) also attends to
the ``r`` full-precision residual tokens (keys/values ``[B, H, r, D]`` in the model's dtype, strided views of the
layer's buffers) in the same kernel — one program per (row, KV head, query head), the residual's logits by a
broadcast product and reduction over ``D`` — and writes the normalised output ``[B, H, G, Dv]`` in the query's dtype,
so a decoding step runs two kernel launches and no PyTorch operation on the residual. The number of splits is chosen
for about ``config.programs_per_sm`` programs per multiprocessor (:func:`choose_splits`).

Numerics follow the reference: dequantised keys/values and the softmax weights are cast to the query's dtype before
each product (bf16/fp16 tensor-core products, float32 accumulation; float32 queries use IEEE float32 products, no
TF32); logits are scaled in float32 (the residual's logits stay float32, where the reference rounds them to the
query's dtype). (In the CPU interpreter, bfloat16 products are computed in float32: its bfloat16 ``tl.dot`` is
wrong.)

The module imports ``triton``; :mod:`squeezekv.channel.kivi` imports it lazily and only when the kernel is used.
With ``TRITON_INTERPRET=1`` set before this module is imported, the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any

import torch
import triton
import triton.language as tl

from . import triton_common as _common
from .kernels import KIVI_VARIANTS as VARIANTS
from .kernels import KiviKernelConfig
from .triton_common import interpreting
from .triton_common import sms as _sms

#: the launch settings used when a call passes none
DEFAULT_CONFIG = KiviKernelConfig()


def supports(device: torch.device, d: int, dv: int, bits: int, group_size: int,
             dtype: torch.dtype | None = None) -> str | None:
    """None if the kernel can run for this device, layout and query dtype, else the reason it cannot."""
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"the query is on {device.type}, the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1 on CPU)"
    if device.type == "cuda" and dtype == torch.bfloat16 and _capability(device) < (8, 0):
        return "bfloat16 products need a GPU of compute capability 8.0 or newer"
    if bits not in (1, 2, 4, 8):
        return f"bits={bits} does not pack into bytes"
    for dim, what in ((d, "key"), (dv, "value")):
        if dim < 16 or (dim * bits) % 8:
            return f"the {what} head dimension {dim} is too small for the kernel (needs >= 16 and whole bytes)"
    if dv % group_size:
        return f"the value head dimension {dv} is not a multiple of group_size={group_size}"
    return None


@triton.jit
def _row_of(pid_bh, H, SLOTS, NQ, nq, HAS_SLOTS: tl.constexpr):
    """(storage row, KV head, quantised positions) of program row ``pid_bh``: row ``pid_bh // H`` of the batch and
    the call's ``nq``; with ``HAS_SLOTS`` (a runtime pool, :func:`pool_decode_attend`) the row's pool slot
    ``SLOTS[b]`` and that slot's own count ``NQ[slot]``."""
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    if HAS_SLOTS:
        b = tl.load(SLOTS + b).to(tl.int64)
        nq = tl.load(NQ + b)
    return b, h, nq


@triton.jit
def _split_kernel(
    Q, KC, VC, KS, KZ, VS, VZ, KGID, MO, LO, AO, SLOTS, NQ,
    nq, H, split_len, scaling,
    skc_b, skc_h, skc_n,
    svc_b, svc_h, svc_n,
    sks_b, sks_h, sks_g,
    svs_b, svs_h, svs_n,
    sgid_b, sgid_h, sgid_n,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_PK: tl.constexpr, BLOCK_PV: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_GID: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_V: tl.constexpr, KEY_ROWS: tl.constexpr, VALUE_ROWS: tl.constexpr,
    HAS_SLOTS: tl.constexpr = False,
):
    PER: tl.constexpr = 8 // BITS  # codes per byte
    BLOCK_D: tl.constexpr = BLOCK_PK * PER
    BLOCK_DV: tl.constexpr = BLOCK_PV * PER
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    b, h, nq = _row_of(pid_bh, H, SLOTS, NQ, nq, HAS_SLOTS)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_pk = tl.arange(0, BLOCK_PK)
    offs_pv = tl.arange(0, BLOCK_PV)
    offs_n = tl.arange(0, BLOCK_N)
    shifts = tl.arange(0, PER) * BITS  # [PER]
    gmask = offs_g < G
    dmask = offs_d < D
    dvmask = offs_dv < DV

    # queries of the G heads of this KV head: [BLOCK_G, BLOCK_D] (padded rows/channels are 0)
    q_ptr = Q + pid_bh.to(tl.int64) * (G * D)
    q = tl.load(q_ptr + offs_g[:, None] * D + offs_d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:  # the interpreter's bfloat16 products are wrong: float32 there
        q = q.to(tl.float32)

    kc_ptr = KC + b * skc_b + h * skc_h
    vc_ptr = VC + b * svc_b + h * svc_h
    ks_ptr = KS + b * sks_b + h * sks_h
    kz_ptr = KZ + b * sks_b + h * sks_h
    vs_ptr = VS + b * svs_b + h * svs_h
    vz_ptr = VZ + b * svs_b + h * svs_h

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, nq)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n  # [BLOCK_N]
        nmask = pos < end
        # keys: packed bytes [BLOCK_N, BLOCK_PK] -> codes [BLOCK_N, BLOCK_D] (byte j holds channels j*PER .. +PER-1)
        if EVEN_K:
            kb = tl.load(kc_ptr + pos[:, None] * skc_n + offs_pk[None, :], mask=nmask[:, None], other=0)
        else:
            kb = tl.load(kc_ptr + pos[:, None] * skc_n + offs_pk[None, :],
                         mask=nmask[:, None] & (offs_pk[None, :] < D // PER), other=0)
        kq = (kb[:, :, None].to(tl.int32) >> shifts[None, None, :]) & CODE_MASK
        kq = tl.reshape(kq, [BLOCK_N, BLOCK_D]).to(tl.float32)
        if KEY_ROWS:  # whole groups in storage order: load each group's row once, repeat it over its GS tokens
            NGK: tl.constexpr = BLOCK_N // GS
            rows = n0 // GS + tl.arange(0, NGK)
            rmask = rows * GS < end
            if EVEN_K:
                rmask2 = rmask[:, None]
            else:
                rmask2 = rmask[:, None] & dmask[None, :]
            r_off = rows[:, None] * sks_g + offs_d[None, :]
            ks = tl.load(ks_ptr + r_off, mask=rmask2, other=0.0).to(tl.float32)  # [NGK, BLOCK_D]
            kz = tl.load(kz_ptr + r_off, mask=rmask2, other=0.0).to(tl.float32)
            ks = tl.reshape(tl.broadcast_to(ks[:, None, :], [NGK, GS, BLOCK_D]), [BLOCK_N, BLOCK_D])
            kz = tl.reshape(tl.broadcast_to(kz[:, None, :], [NGK, GS, BLOCK_D]), [BLOCK_N, BLOCK_D])
        else:
            if HAS_GID:
                grp = tl.load(KGID + b * sgid_b + h * sgid_h + pos * sgid_n, mask=nmask, other=0).to(tl.int32)
            else:
                grp = pos // GS
            if EVEN_K:
                kmask = nmask[:, None]
            else:
                kmask = nmask[:, None] & dmask[None, :]
            k_off = grp[:, None] * sks_g + offs_d[None, :]
            ks = tl.load(ks_ptr + k_off, mask=kmask, other=0.0).to(tl.float32)
            kz = tl.load(kz_ptr + k_off, mask=kmask, other=0.0).to(tl.float32)
        k = (kq * ks + kz).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling  # [BLOCK_G, BLOCK_N] float32
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds at least one position
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # values: per token, channel group d // GS
        if EVEN_V:
            vb = tl.load(vc_ptr + pos[:, None] * svc_n + offs_pv[None, :], mask=nmask[:, None], other=0)
        else:
            vb = tl.load(vc_ptr + pos[:, None] * svc_n + offs_pv[None, :],
                         mask=nmask[:, None] & (offs_pv[None, :] < DV // PER), other=0)
        vq = (vb[:, :, None].to(tl.int32) >> shifts[None, None, :]) & CODE_MASK
        vq = tl.reshape(vq, [BLOCK_N, BLOCK_DV]).to(tl.float32)
        if VALUE_ROWS:  # DV // GS channel groups, a power of 2: load them once per token, repeat over GS channels
            NGV: tl.constexpr = BLOCK_DV // GS
            c_off = pos[:, None] * svs_n + tl.arange(0, NGV)[None, :]
            vs = tl.load(vs_ptr + c_off, mask=nmask[:, None], other=0.0).to(tl.float32)  # [BLOCK_N, NGV]
            vz = tl.load(vz_ptr + c_off, mask=nmask[:, None], other=0.0).to(tl.float32)
            vs = tl.reshape(tl.broadcast_to(vs[:, :, None], [BLOCK_N, NGV, GS]), [BLOCK_N, BLOCK_DV])
            vz = tl.reshape(tl.broadcast_to(vz[:, :, None], [BLOCK_N, NGV, GS]), [BLOCK_N, BLOCK_DV])
        else:
            vmask = nmask[:, None] & dvmask[None, :]
            v_off = pos[:, None] * svs_n + offs_dv[None, :] // GS
            vs = tl.load(vs_ptr + v_off, mask=vmask, other=0.0).to(tl.float32)
            vz = tl.load(vz_ptr + v_off, mask=vmask, other=0.0).to(tl.float32)
        v = (vq * vs + vz).to(q.dtype)  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m_i = m_new

    row = (pid_bh.to(tl.int64) * n_split + pid_s) * G + offs_g  # [BLOCK_G] rows of [B*H, S, G]
    tl.store(MO + row, m_i, mask=gmask)
    tl.store(LO + row, l_i, mask=gmask)
    tl.store(AO + row[:, None] * DV + offs_dv[None, :], acc, mask=gmask[:, None] & dvmask[None, :])


@triton.jit
def _plane(byts, I: tl.constexpr, BITS: tl.constexpr):
    """Codes of bit plane ``I`` (channels ``j * 8 / BITS + I``) of packed bytes ``byts`` (int32), as float32."""
    return ((byts >> (I * BITS)) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _key_plane(byts, KS_P, KZ_P, grp_off, kmask, offs_pk, I: tl.constexpr, PER: tl.constexpr, BITS: tl.constexpr,
               DT: tl.constexpr):
    """Dequantised keys of bit plane ``I`` ``[BLOCK_N, BLOCK_PK]`` (``grp_off``: offset of each token's scale row,
    ``[BLOCK_N, 1]`` or ``[1, 1]`` when the block lies in one group)."""
    off = grp_off + offs_pk[None, :] * PER + I
    ks = tl.load(KS_P + off, mask=kmask, other=0.0).to(tl.float32)
    kz = tl.load(KZ_P + off, mask=kmask, other=0.0).to(tl.float32)
    return (_plane(byts, I, BITS) * ks + kz).to(DT)


@triton.jit
def _value_plane(byts, vs, vz, I: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """Dequantised values of bit plane ``I`` ``[BLOCK_N, BLOCK_PV]`` (``vs``/``vz``: the scale/zero of each
    (token, byte): channel ``j * PER + I`` lies in group ``j // (GS / PER)`` whatever the plane)."""
    return (_plane(byts, I, BITS) * vs + vz).to(DT)


@triton.jit
def _qk(q, k, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Logits ``[BLOCK_G, BLOCK_N]`` of queries ``q`` ``[BLOCK_G, C]`` and keys ``k`` ``[BLOCK_N, C]``: a tensor-core
    ``tl.dot`` (``BLOCK_G`` >= 16) or a broadcast product + reduction over ``C`` in float32 (small ``BLOCK_G``)."""
    if DOT:
        return tl.dot(q, tl.trans(k), input_precision=PRECISION)
    return tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2)


@triton.jit
def _pv(p, v, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``p @ v`` for weights ``[BLOCK_G, BLOCK_N]`` and values ``[BLOCK_N, C]`` (as :func:`_qk`)."""
    if DOT:
        return tl.dot(p, v, input_precision=PRECISION)
    return tl.sum(p.to(tl.float32)[:, :, None] * v.to(tl.float32)[None, :, :], 1)


@triton.jit
def _split_kernel_planes(
    Q, KC, VC, KS, KZ, VS, VZ, KGID, MO, LO, AO, SLOTS, NQ,
    nq, H, split_len, scaling,
    skc_b, skc_h, skc_n,
    svc_b, svc_h, svc_n,
    sks_b, sks_h, sks_g,
    svs_b, svs_h, svs_n,
    sgid_b, sgid_h, sgid_n,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_PK: tl.constexpr, BLOCK_PV: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_GID: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ONE_GROUP: tl.constexpr,
    DOT: tl.constexpr, HAS_SLOTS: tl.constexpr = False,
):
    # the "planes" variant: bit plane I of a byte row holds channels j * PER + I (j = byte); each plane is its own
    # [BLOCK_N, D / PER] operand (a dot over D / PER channels per plane, PER dots summed), so the codes are never
    # interleaved back into channel order in registers (no reshape / layout conversion of the unpacked codes)
    PER: tl.constexpr = 8 // BITS
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    b, h, nq = _row_of(pid_bh, H, SLOTS, NQ, nq, HAS_SLOTS)
    offs_g = tl.arange(0, BLOCK_G)
    offs_pk = tl.arange(0, BLOCK_PK)
    offs_pv = tl.arange(0, BLOCK_PV)
    offs_n = tl.arange(0, BLOCK_N)
    gmask = offs_g < G
    pkmask = offs_pk < D // PER
    pvmask = offs_pv < DV // PER
    qmask = gmask[:, None] & pkmask[None, :]
    q_ptr = Q + pid_bh.to(tl.int64) * (G * D) + offs_g[:, None] * D + offs_pk[None, :] * PER
    q0 = tl.load(q_ptr, mask=qmask, other=0.0)
    q1 = q0
    q2 = q0
    q3 = q0
    if PER > 1:
        q1 = tl.load(q_ptr + 1, mask=qmask, other=0.0)
    if PER > 2:
        q2 = tl.load(q_ptr + 2, mask=qmask, other=0.0)
        q3 = tl.load(q_ptr + 3, mask=qmask, other=0.0)
    if UPCAST:
        q0 = q0.to(tl.float32)
        q1 = q1.to(tl.float32)
        q2 = q2.to(tl.float32)
        q3 = q3.to(tl.float32)
    DT = q0.dtype

    kc_ptr = KC + b * skc_b + h * skc_h
    vc_ptr = VC + b * svc_b + h * svc_h
    ks_ptr = KS + b * sks_b + h * sks_h
    kz_ptr = KZ + b * sks_b + h * sks_h
    vs_ptr = VS + b * svs_b + h * svs_h
    vz_ptr = VZ + b * svs_b + h * svs_h

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc0 = tl.zeros([BLOCK_G, BLOCK_PV], tl.float32)
    acc1 = tl.zeros([BLOCK_G, BLOCK_PV], tl.float32)
    acc2 = tl.zeros([BLOCK_G, BLOCK_PV], tl.float32)
    acc3 = tl.zeros([BLOCK_G, BLOCK_PV], tl.float32)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, nq)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n  # [BLOCK_N]
        nmask = pos < end
        kb = tl.load(kc_ptr + pos[:, None] * skc_n + offs_pk[None, :], mask=nmask[:, None] & pkmask[None, :],
                     other=0).to(tl.int32)  # [BLOCK_N, BLOCK_PK]
        if ONE_GROUP:  # the block lies in one key group (GS a multiple of BLOCK_N): one scale row for all tokens
            grp_off = tl.zeros([1, 1], tl.int64) + (n0 // GS) * sks_g
            kmask = pkmask[None, :]
        else:
            if HAS_GID:
                grp = tl.load(KGID + b * sgid_b + h * sgid_h + pos * sgid_n, mask=nmask, other=0).to(tl.int64)
            else:
                grp = (pos // GS).to(tl.int64)
            grp_off = grp[:, None] * sks_g
            kmask = nmask[:, None] & pkmask[None, :]
        k0 = _key_plane(kb, ks_ptr, kz_ptr, grp_off, kmask, offs_pk, 0, PER, BITS, DT)
        s = _qk(q0, k0, DOT, PRECISION)
        if PER > 1:
            k1 = _key_plane(kb, ks_ptr, kz_ptr, grp_off, kmask, offs_pk, 1, PER, BITS, DT)
            s += _qk(q1, k1, DOT, PRECISION)
        if PER > 2:
            k2 = _key_plane(kb, ks_ptr, kz_ptr, grp_off, kmask, offs_pk, 2, PER, BITS, DT)
            s += _qk(q2, k2, DOT, PRECISION)
            k3 = _key_plane(kb, ks_ptr, kz_ptr, grp_off, kmask, offs_pk, 3, PER, BITS, DT)
            s += _qk(q3, k3, DOT, PRECISION)
        s = tl.where(nmask[None, :], s * scaling, float("-inf"))  # [BLOCK_G, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pd = p.to(DT)
        vmask = nmask[:, None] & pvmask[None, :]
        vb = tl.load(vc_ptr + pos[:, None] * svc_n + offs_pv[None, :], mask=vmask, other=0).to(tl.int32)
        v_off = pos[:, None].to(tl.int64) * svs_n + (offs_pv // (GS // PER))[None, :]  # one tile for all planes
        vs = tl.load(vs_ptr + v_off, mask=vmask, other=0.0).to(tl.float32)
        vz = tl.load(vz_ptr + v_off, mask=vmask, other=0.0).to(tl.float32)
        v0 = _value_plane(vb, vs, vz, 0, BITS, DT)
        acc0 = acc0 * alpha[:, None] + _pv(pd, v0, DOT, PRECISION)
        if PER > 1:
            v1 = _value_plane(vb, vs, vz, 1, BITS, DT)
            acc1 = acc1 * alpha[:, None] + _pv(pd, v1, DOT, PRECISION)
        if PER > 2:
            v2 = _value_plane(vb, vs, vz, 2, BITS, DT)
            acc2 = acc2 * alpha[:, None] + _pv(pd, v2, DOT, PRECISION)
            v3 = _value_plane(vb, vs, vz, 3, BITS, DT)
            acc3 = acc3 * alpha[:, None] + _pv(pd, v3, DOT, PRECISION)
        m_i = m_new

    row = (pid_bh.to(tl.int64) * n_split + pid_s) * G + offs_g  # [BLOCK_G] rows of [B*H, S, G]
    tl.store(MO + row, m_i, mask=gmask)
    tl.store(LO + row, l_i, mask=gmask)
    a_ptr = AO + row[:, None] * DV + offs_pv[None, :] * PER
    amask = gmask[:, None] & pvmask[None, :]
    tl.store(a_ptr, acc0, mask=amask)
    if PER > 1:
        tl.store(a_ptr + 1, acc1, mask=amask)
    if PER > 2:
        tl.store(a_ptr + 2, acc2, mask=amask)
        tl.store(a_ptr + 3, acc3, mask=amask)


@triton.jit
def _finish_row(MO, LO, AO, Q, RK, RV, OUT, S, r, scaling, srk_b, srk_h, srk_n, srv_b, srv_h, srv_n, bh, g, b, h,
                G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr):
    """Merge the S split states of query head ``g`` of (row, KV head) ``bh`` (as
    :func:`squeezekv.channel.triton_common.merge_kernel`), then attend to the r full-precision residual tokens (keys
    RK / values RV [B, H, r, D], any strides with a unit last stride) with
    the same online softmax, and store the normalised output in the output's dtype. The split states are loaded
    through L2 only (``.cg``): each is read once."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, BLOCK_R)
    dmask = offs_d < D
    dvmask = offs_dv < DV
    base = bh.to(tl.int64) * S
    m_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        smask = s0 + offs_s < S
        m_max = tl.maximum(m_max, tl.load(MO + (base + s0 + offs_s) * G + g, mask=smask, other=float("-inf"),
                                          cache_modifier=".cg"))
    m_i = tl.max(m_max, 0)
    # no quantised position at all (a runtime slot whose prompt fits in the residual): a very small finite max, so
    # the empty states weigh 0 and the residual's first block takes over (alpha = 0)
    m_i = tl.where(m_i == float("-inf"), -1e30, m_i)
    l_vec = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        smask = s0 + offs_s < S
        row = (base + s0 + offs_s) * G + g
        w = tl.exp(tl.load(MO + row, mask=smask, other=float("-inf"), cache_modifier=".cg") - m_i)
        l_vec += tl.load(LO + row, mask=smask, other=0.0, cache_modifier=".cg") * w
        a = tl.load(AO + row[:, None] * DV + offs_dv[None, :], mask=smask[:, None] & dvmask[None, :], other=0.0,
                    cache_modifier=".cg")
        acc += tl.sum(a * w[:, None], 0)
    l_i = tl.sum(l_vec, 0)
    # the residual: logits by a broadcast product + reduction over D (one query head: no padded tl.dot)
    qrow = bh.to(tl.int64) * G + g
    q = tl.load(Q + qrow * D + offs_d, mask=dmask, other=0.0)
    qf = q.to(tl.float32)
    rk_ptr = RK + b * srk_b + h * srk_h
    rv_ptr = RV + b * srv_b + h * srv_h
    for n0 in range(0, r, BLOCK_R):
        pos = n0 + offs_r
        nmask = pos < r
        k = tl.load(rk_ptr + pos[:, None] * srk_n + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        s = tl.sum(k.to(q.dtype).to(tl.float32) * qf[None, :], 1) * scaling  # [BLOCK_R]
        s = tl.where(nmask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(rv_ptr + pos[:, None] * srv_n + offs_dv[None, :], mask=nmask[:, None] & dvmask[None, :],
                    other=0.0)
        pw = p.to(v.dtype).to(tl.float32)  # the weights in the values' dtype before the product, as the reference
        acc = acc * alpha + tl.sum(pw[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    out = acc / l_i
    tl.store(OUT + qrow * DV + offs_dv, out.to(OUT.dtype.element_ty), mask=dvmask)


@triton.jit
def _finish_kernel(MO, LO, AO, Q, RK, RV, OUT, S, r, scaling,
                   srk_b, srk_h, srk_n, srv_b, srv_h, srv_n, H,
                   G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr):
    # one program per (row, KV head, query head of the group)
    pid = tl.program_id(0)
    bh = pid // G
    g = pid % G
    _finish_row(MO, LO, AO, Q, RK, RV, OUT, S, r, scaling, srk_b, srk_h, srk_n, srv_b, srv_h, srv_n, bh, g,
                (bh // H).to(tl.int64), (bh % H).to(tl.int64), G, D, DV, BLOCK_S, BLOCK_D, BLOCK_DV, BLOCK_R)


@triton.jit
def _finish_slots_kernel(MO, LO, AO, Q, RK, RV, OUT, S, SLOTS, LENS, scaling,
                         srk_s, srk_h, srk_n, srv_s, srv_h, srv_n, sl_b, sl_h, H,
                         G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr):
    # :func:`_finish_kernel` over a runtime pool: the residual of row b is the first LENS[b, h] entries of its
    # slot SLOTS[b] (full-precision pool keys/values [S, H, C, D])
    pid = tl.program_id(0)
    bh = pid // G
    g = pid % G
    b = bh // H
    h = (bh % H).to(tl.int64)
    slot = tl.load(SLOTS + b).to(tl.int64)
    r = tl.load(LENS + b * sl_b + h * sl_h)
    _finish_row(MO, LO, AO, Q, RK, RV, OUT, S, r, scaling, srk_s, srk_h, srk_n, srv_s, srv_h, srv_n, bh, g, slot, h,
                G, D, DV, BLOCK_S, BLOCK_D, BLOCK_DV, BLOCK_R)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def choose_splits(nq: int, bh: int, sms: int, block_n: int,
                  programs_per_sm: int = DEFAULT_CONFIG.programs_per_sm) -> tuple[int, int]:
    """:func:`squeezekv.channel.triton_common.choose_splits` (default target: :data:`DEFAULT_CONFIG`'s
    ``programs_per_sm``)."""
    return _common.choose_splits(nq, bh, sms, block_n, programs_per_sm)


def planes_apply(d: int, dv: int, bits: int, group_size: int, dot: bool = True) -> bool:
    """Whether the ``"planes"`` variants cover this layout: 2, 4 or 8 bits, ``group_size`` a multiple of the codes
    per byte, and for ``"planes"`` (``dot``) at least 16 bytes of codes per token for keys and values (one ``tl.dot``
    operand per bit plane)."""
    per = 8 // bits
    return bits in (2, 4, 8) and group_size % per == 0 and (not dot or (d // per >= 16 and dv // per >= 16))


def choose_variant(d: int, dv: int, bits: int, group_size: int, variant: str = DEFAULT_CONFIG.variant) -> str:
    """The split kernel run for ``variant`` (a config's ``variant``): ``"auto"`` takes ``"planes"`` where
    :func:`planes_apply`, else ``"interleaved"``; ``"planes"``/``"planes_fma"`` fall back to ``"interleaved"`` where
    they do not apply."""
    if variant not in VARIANTS + ("auto",):
        raise ValueError(f"variant={variant!r} is out of range: choose one of {VARIANTS + ('auto',)}")
    if variant == "interleaved" or not planes_apply(d, dv, bits, group_size, dot=variant != "planes_fma"):
        return "interleaved"
    return "planes_fma" if variant == "planes_fma" else "planes"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit stride on its last dimension (a view of the layer's buffer when it already has one)."""
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=4096)
def _launch_config(b: int, h: int, g: int, d: int, dv: int, nq: int, bits: int, group_size: int, has_gid: bool,
                   dtype: torch.dtype, device: torch.device, splits: int | None, config: KiviKernelConfig
                   ) -> tuple[Any, int, int, dict[str, Any]]:
    """(split kernel, splits, tokens per split, its constexpr/launch keywords) for one call shape and config (cached:
    a decoding step repeats the previous step's shape until the next flush)."""
    if nq == 0:
        raise ValueError("the fused KIVI kernel needs at least one quantised position")
    why = supports(device, d, dv, bits, group_size)
    if why is not None:
        raise ValueError(f"the fused KIVI kernel cannot run: {why}")
    var = choose_variant(d, dv, bits, group_size, config.variant)
    block_n = config.block_n_for(var)
    if splits is None:
        splits, split_len = choose_splits(nq, b * h, _sms(device), block_n, config.programs_per_sm)
    else:
        split_len = math.ceil(math.ceil(nq / max(1, splits)) / block_n) * block_n
        splits = math.ceil(nq / split_len)
    per = 8 // bits
    upcast = dtype == torch.bfloat16 and device.type == "cpu"  # CPU = interpreter
    block_pk, block_pv = triton.next_power_of_2(d // per), triton.next_power_of_2(dv // per)
    kw: dict[str, Any] = dict(
        G=g, D=d, DV=dv, BITS=bits, GS=group_size, BLOCK_G=max(16, triton.next_power_of_2(g)),
        BLOCK_PK=block_pk, BLOCK_PV=block_pv, BLOCK_N=block_n, HAS_GID=has_gid,
        PRECISION="ieee" if dtype == torch.float32 or upcast else None, UPCAST=upcast, num_warps=config.num_warps)
    if var != "interleaved":
        kw["ONE_GROUP"] = not has_gid and group_size % block_n == 0
        kw["DOT"] = var == "planes"
        if var == "planes_fma":  # no tensor-core product: the query heads are not padded to 16 rows
            kw["BLOCK_G"] = triton.next_power_of_2(g)
        return _split_kernel_planes, splits, split_len, kw

    def pow2(x: int) -> bool:
        return x & (x - 1) == 0

    kw.update(EVEN_K=block_pk * per == d, EVEN_V=block_pv * per == dv,
              KEY_ROWS=not has_gid and block_n % group_size == 0 and pow2(block_n // group_size),
              VALUE_ROWS=block_pv * per == dv and pow2(dv // group_size))
    return _split_kernel, splits, split_len, kw


def _split_partials(q, kcode, vcode, kscale, kzero, vscale, vzero, kgid, bits, group_size, scaling, splits, config,
                    plan=None):
    """Launch the split kernel: float32 partial states ``(max, sum [B*H, S, G], acc [B*H, S, G, Dv])`` (one
    allocation). ``plan``: a dict the caller keeps between calls (e.g. one per layer); the launch's scalar arguments
    are kept there (with weak references to the storage tensors) and reused while the same tensors come back, so a
    decoding step between two flushes skips the stride and layout work."""
    store = (kcode, vcode, kscale, kzero, vscale, vzero, kgid)
    key = (q.shape, q.dtype, q.device, bits, group_size, float(scaling), splits, config)
    if plan is not None and plan.get("key") == key and all(
            (t is None and r is None) or (r is not None and r() is t) for r, t in zip(plan["refs"], store)):
        kernel, splits, grid_args, kw, sizes = plan["launch"]
    else:
        b, h, g, d = q.shape
        nq = kcode.shape[2]
        dv = vcode.shape[-1] * 8 // bits
        kernel, splits, split_len, kw = _launch_config(
            b, h, g, d, dv, nq, bits, group_size, kgid is not None, q.dtype, q.device, splits, config)
        views = tuple(map(_rows, (kcode, vcode, kscale, kzero, vscale, vzero)))
        kc, vc, ks, kz, vs, vz = views
        if kz.stride() != ks.stride() or vz.stride() != vs.stride():
            ks, kz, vs, vz = (t.contiguous() for t in (ks, kz, vs, vz))
        copied = any(x is not y for x, y in zip((kc, vc, ks, kz, vs, vz), store))
        store = (kc, vc, ks, kz, vs, vz, kgid)
        gid_strides = (0, 0, 0) if kgid is None else kgid.stride()
        grid_args = (nq, h, split_len, float(scaling), *kc.stride()[:3], *vc.stride()[:3], *ks.stride()[:3],
                     *vs.stride()[:3], *gid_strides)
        n_ml = -(-b * h * splits * g // 4) * 4  # max and sum blocks rounded to 16 bytes
        sizes = (b * h, splits, g, dv, n_ml)
        if plan is not None and not copied:
            plan["key"] = key
            plan["refs"] = tuple(None if t is None else weakref.ref(t) for t in store)
            plan["launch"] = (kernel, splits, grid_args, kw, sizes)
    bh, splits, g, dv, n_ml = sizes
    part = torch.empty(2 * n_ml + bh * splits * g * dv, device=q.device, dtype=torch.float32)
    m_part, l_part = part[:bh * splits * g].view(bh, splits, g), part[n_ml:n_ml + bh * splits * g].view(bh, splits, g)
    a_part = part[2 * n_ml:].view(bh, splits, g, dv)
    kc, vc, ks, kz, vs, vz, gid = store
    kernel[(bh, splits)](q, kc, vc, ks, kz, vs, vz, kc if gid is None else gid, m_part, l_part, a_part, kc, kc,
                         *grid_args,
                         **kw)
    return m_part, l_part, a_part, splits


def decode_state(
    q: torch.Tensor,
    kcode: torch.Tensor,
    vcode: torch.Tensor,
    kscale: torch.Tensor,
    kzero: torch.Tensor,
    vscale: torch.Tensor,
    vzero: torch.Tensor,
    kgid: torch.Tensor | None,
    bits: int,
    group_size: int,
    scaling: float,
    splits: int | None = None,
    config: KiviKernelConfig = DEFAULT_CONFIG,
    plan: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online-softmax state of one query token per query head over ``nq`` quantised positions.

    ``q`` ``[B, H, G, D]`` (the ``G`` query heads of each KV head); ``kcode``/``vcode`` ``[B, H, nq, D*bits/8]`` /
    ``[B, H, nq, Dv*bits/8]`` uint8; ``kscale``/``kzero`` ``[B, H, ng, D]``; ``vscale``/``vzero``
    ``[B, H, nq, Dv/group_size]``; ``kgid`` ``[B, H, nq]`` or None (group ``p // group_size``). ``splits``: number
    of token splits (default: :func:`choose_splits` with ``config.programs_per_sm``); ``config``: the launch
    settings (:class:`~squeezekv.channel.kernels.KiviKernelConfig`: variant, tokens per block, warps); ``plan``: a
    dict kept by the caller between calls (launch arguments reused while the same storage tensors come back).
    Returns float32 ``(max [B, H, G], sum [B, H, G], acc [B, H, G, Dv])`` with
    ``acc = sum_p exp(logit_p - max) v_p`` and ``sum = sum_p exp(logit_p - max)``."""
    b, h, g, _ = q.shape
    dv = vcode.shape[-1] * 8 // bits
    q = q.contiguous()
    m_part, l_part, a_part, splits = _split_partials(q, kcode, vcode, kscale, kzero, vscale, vzero, kgid, bits,
                                                     group_size, scaling, splits, config, plan)
    return _common.merge_states(m_part, l_part, a_part, b, h, g, dv, splits)


def decode_attend(
    q: torch.Tensor,
    kcode: torch.Tensor,
    vcode: torch.Tensor,
    kscale: torch.Tensor,
    kzero: torch.Tensor,
    vscale: torch.Tensor,
    vzero: torch.Tensor,
    kgid: torch.Tensor | None,
    rkeys: torch.Tensor,
    rvalues: torch.Tensor,
    bits: int,
    group_size: int,
    scaling: float,
    splits: int | None = None,
    config: KiviKernelConfig = DEFAULT_CONFIG,
    plan: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Attention output ``[B, H, G, Dv]`` (``q``'s dtype) of one query token per query head over ``nq`` quantised
    positions and then the ``r`` full-precision residual positions ``rkeys``/``rvalues`` ``[B, H, r, D]`` / ``[B, H,
    r, Dv]`` (float32/bfloat16/float16, any strides with a unit last stride; ``r`` may be 0). The quantised part as in
    :func:`decode_state` (same arguments); the second kernel merges the splits, attends to the residual with the same
    online softmax (``config.block_r`` residual tokens per step) and writes the normalised output: no PyTorch
    operation runs on the residual."""
    b, h, g, d = q.shape
    dv = vcode.shape[-1] * 8 // bits
    r = rkeys.shape[2]
    if rkeys.shape[:2] != (b, h) or rvalues.shape[:3] != (b, h, r) or rkeys.shape[3] != d or rvalues.shape[3] != dv:
        raise ValueError(f"residual keys {tuple(rkeys.shape)} / values {tuple(rvalues.shape)} do not match the query "
                         f"{tuple(q.shape)} and value head dimension {dv}")
    q = q.contiguous()
    rkeys, rvalues = _rows(rkeys), _rows(rvalues)
    out = torch.empty((b, h, g, dv), device=q.device, dtype=q.dtype)
    m_part, l_part, a_part, splits = _split_partials(q, kcode, vcode, kscale, kzero, vscale, vzero, kgid, bits,
                                                     group_size, scaling, splits, config, plan)
    _finish_kernel[(b * h * g,)](
        m_part, l_part, a_part, q, rkeys, rvalues, out, splits, r, float(scaling), *rkeys.stride()[:3],
        *rvalues.stride()[:3], h, G=g, D=d, DV=dv, BLOCK_S=16, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_DV=triton.next_power_of_2(dv), BLOCK_R=config.block_r, num_warps=4,
    )  # [B, H, G, Dv]
    return out


def pool_decode_attend(
    q: torch.Tensor,
    kcode: torch.Tensor,
    vcode: torch.Tensor,
    kscale: torch.Tensor,
    kzero: torch.Tensor,
    vscale: torch.Tensor,
    vzero: torch.Tensor,
    slots: torch.Tensor,
    nq: torch.Tensor,
    rkeys: torch.Tensor,
    rvalues: torch.Tensor,
    lengths: torch.Tensor,
    bits: int,
    group_size: int,
    scaling: float,
    config: KiviKernelConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """:func:`decode_attend` over the slots of a runtime pool (:class:`squeezekv.runtime.kivi_pool.KiviPool`): row
    ``b`` of ``q`` ``[B, H, G, D]`` attends to the first ``nq[slots[b]]`` quantised positions of its slot (codes
    ``[S, H, Cq, D*bits/8]``, key scales/zeros ``[S, H, Cq/group_size, D]``, value scales/zeros
    ``[S, H, Cq, Dv/group_size]``; groups in storage order) and then to the first ``lengths[b, h]`` full-precision
    entries of its slot in ``rkeys``/``rvalues`` ``[S, H, C, D]``. ``slots`` ``[B]`` int64, ``nq`` ``[S]`` int32 (a
    slot may hold none), ``lengths`` ``[B, H]`` int32 (at least 1). The grid depends on ``Cq`` and ``B * H`` only,
    never on the counts (no host synchronisation: the step can be captured as a CUDA graph). Returns ``[B, H, G, Dv]``
    in ``q``'s dtype."""
    b, h, g, d = q.shape
    cq = kcode.shape[2]
    dv = vcode.shape[-1] * 8 // bits
    kernel, splits, split_len, kw = _launch_config(b, h, g, d, dv, cq, bits, group_size, False, q.dtype, q.device,
                                                   None, config)
    q = q.contiguous()
    f32 = dict(device=q.device, dtype=torch.float32)
    m_part = torch.empty((b * h, splits, g), **f32)
    l_part = torch.empty_like(m_part)
    a_part = torch.empty((b * h, splits, g, dv), **f32)
    kernel[(b * h, splits)](q, kcode, vcode, kscale, kzero, vscale, vzero, kcode, m_part, l_part, a_part, slots, nq,
                            cq, h, split_len, float(scaling), *kcode.stride()[:3], *vcode.stride()[:3],
                            *kscale.stride()[:3], *vscale.stride()[:3], 0, 0, 0, HAS_SLOTS=True, **kw)
    out = torch.empty((b, h, g, dv), device=q.device, dtype=q.dtype)
    _finish_slots_kernel[(b * h * g,)](
        m_part, l_part, a_part, q, rkeys, rvalues, out, splits, slots, lengths, float(scaling),
        *rkeys.stride()[:3], *rvalues.stride()[:3], lengths.stride(0), lengths.stride(1), h, G=g, D=d, DV=dv,
        BLOCK_S=16, BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=triton.next_power_of_2(dv), BLOCK_R=config.block_r,
        num_warps=4,
    )
    return out
