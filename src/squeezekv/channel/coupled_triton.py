"""Fused decode attention for Coupled Quantization: a Triton kernel that attends one query token over the packed codes
of :class:`squeezekv.channel.coupled.CoupledLayer`, gathering each key/value channel straight from the codebook in
registers, so no dequantised key or value is ever written to memory.

Storage read (see :mod:`squeezekv.channel.coupled`): codes ``[B, H, nq, (D / c) * w / 8]`` uint8, one code of
``w = bits * c`` bits per group of ``c`` channels (code of group ``j`` at bit offset ``(j * w) % 8`` of byte
``j * w // 8``, as :mod:`squeezekv.channel.packing` writes it; ``w = 8`` for the paper's 8c8b / 4c8b: one byte per
group); codebooks ``[H, D / c, 2**w, c]`` per layer for keys and for values (``2 * H * D * 2**w`` values), read in
the query's dtype (the reference path rounds every looked-up key/value to the model's dtype, so this changes no
result): 1 MiB per layer for the 8B shape in bf16 at ``w = 8``, 64 KiB per KV head for keys and again for values, so
the codebooks stay in L2 (and partly L1) while the codes stream from memory. Each key/value element is one gather
from the codebook, a 2-byte load at a data-dependent address.

Flash-decoding layout (split-K), as :mod:`squeezekv.channel.kivi_triton`: the grid is ``(B * H, S)``; program
``(bh, s)`` walks the quantised positions ``[s * L, min((s + 1) * L, nq))`` of one (row, KV head) in blocks of
``BLOCK_N`` tokens (launch settings: a :class:`~squeezekv.channel.kernels.CoupledKernelConfig`, argument
``config``). For each block it loads each channel's code (``[BLOCK_N, D]``, the byte of its group, shifted and
masked), gathers channel ``d`` of centroid ``code`` of group ``d // c`` from the codebook (``book[h, d // c, code,
d % c]``), computes the logits of the ``G = Hq / H`` query heads of the KV head together (one ``tl.dot``, query heads
padded to 16 rows), and accumulates ``P V`` (values gathered the same way) with an online softmax in float32. Each
program writes its partial ``(max, sum, acc)``; a second small kernel merges the ``S`` splits into the state
``(max [B, H, G], sum [B, H, G], acc [B, H, G, Dv])`` that :meth:`QuantizedLayer.attend` merges with the
full-precision residual.

Numerics follow the PyTorch reference path: gathered keys/values and the softmax weights are cast to the query's
dtype before each product (float32 accumulation; float32 queries: IEEE float32 products, no TF32); logits are scaled
in float32. (In the CPU interpreter bfloat16 products are computed in float32: its bfloat16 ``tl.dot`` is wrong.)

Import with ``TRITON_INTERPRET=1`` already set to run the kernels on CPU tensors (tests).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import triton_common as _common
from .kernels import CoupledKernelConfig
from .triton_common import interpreting
from .triton_common import sms as _sms

#: the launch settings used when a call passes none
DEFAULT_CONFIG = CoupledKernelConfig()


def supports(device: torch.device, d: int, dv: int, width: int, channels: int,
             dtype: torch.dtype | None = None) -> str | None:
    """None if the kernel can run for this device, layout (code width ``bits * channels``) and query dtype, else
    the reason it cannot."""
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"the query is on {device.type}, the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1 on CPU)"
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        return "bfloat16 products need a GPU of compute capability 8.0 or newer"
    if width not in (1, 2, 4, 8):
        return f"codes of {width} bits do not pack into bytes"
    for dim, what in ((d, "key"), (dv, "value")):
        if dim < 16 or dim % channels or (dim // channels * width) % 8:
            return f"the {what} head dimension {dim} does not suit the kernel (needs >= 16 and whole bytes of codes)"
    return None


@triton.jit
def _gather(code_ptr, book_ptr, pos, nmask, offs_d, dmask, s_n, C: tl.constexpr, W: tl.constexpr,
            K: tl.constexpr):
    # channel d of each token: code of group d // C (W bits at bit (d // C * W) % 8 of byte d // C * W // 8), then
    # book[group, code, d % C] (book: this head's [D / C, K, C])  -> [BLOCK_N, BLOCK_D] in the book's dtype
    grp = offs_d // C
    byte = tl.load(code_ptr + pos[:, None] * s_n + (grp * W // 8)[None, :], mask=nmask[:, None] & dmask[None, :],
                   other=0)
    code = (byte.to(tl.int32) >> ((grp * W) % 8)[None, :]) & (K - 1)
    off = (grp * (K * C) + offs_d % C)[None, :] + code * C
    return tl.load(book_ptr + off, mask=nmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _gather_groups(code_ptr, book_ptr, pos, nmask, s_n, NG: tl.constexpr, BLOCK_NG: tl.constexpr, C: tl.constexpr,
                   W: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr):
    # the same values as _gather, one code per (token, group) and the C channels of its centroid as one contiguous
    # (vectorisable) load: [BLOCK_N, BLOCK_NG, C] -> [BLOCK_N, BLOCK_NG * C] in the book's dtype
    offs_j = tl.arange(0, BLOCK_NG)
    m2 = nmask[:, None] & (offs_j < NG)[None, :]
    byte = tl.load(code_ptr + pos[:, None] * s_n + (offs_j * W // 8)[None, :], mask=m2, other=0)
    code = (byte.to(tl.int32) >> ((offs_j * W) % 8)[None, :]) & (K - 1)  # [BLOCK_N, BLOCK_NG]
    off = (offs_j * (K * C))[None, :, None] + code[:, :, None] * C + tl.arange(0, C)[None, None, :]
    vals = tl.load(book_ptr + off, mask=m2[:, :, None], other=0.0)
    return tl.reshape(vals, [BLOCK_N, BLOCK_NG * C])


@triton.jit
def _split_kernel(
    Q, KC, VC, KB, VB, MO, LO, AO,
    nq, H, split_len, scaling,
    skc_b, skc_h, skc_n,
    svc_b, svc_h, svc_n,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, W: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, VEC: tl.constexpr,
):
    K: tl.constexpr = 1 << W  # centroids per group
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    gmask = offs_g < G
    dmask = offs_d < D
    dvmask = offs_dv < DV

    q = tl.load(Q + pid_bh.to(tl.int64) * (G * D) + offs_g[:, None] * D + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if UPCAST:  # the interpreter's bfloat16 products are wrong: float32 there
        q = q.to(tl.float32)
    kc_ptr = KC + b * skc_b + h * skc_h
    vc_ptr = VC + b * svc_b + h * svc_h
    kb_ptr = KB + h * (D * K)  # this head's key codebook [D / C, K, C]
    vb_ptr = VB + h * (DV * K)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, nq)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        nmask = pos < end
        if VEC:
            k = _gather_groups(kc_ptr, kb_ptr, pos, nmask, skc_n, D // C, BLOCK_D // C, C, W, K, BLOCK_N).to(q.dtype)
        else:
            k = _gather(kc_ptr, kb_ptr, pos, nmask, offs_d, dmask, skc_n, C, W, K).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling  # [BLOCK_G, BLOCK_N] float32
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds at least one position
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if VEC:
            v = _gather_groups(vc_ptr, vb_ptr, pos, nmask, svc_n, DV // C, BLOCK_DV // C, C, W, K, BLOCK_N).to(q.dtype)
        else:
            v = _gather(vc_ptr, vb_ptr, pos, nmask, offs_dv, dvmask, svc_n, C, W, K).to(q.dtype)  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m_i = m_new

    row = (pid_bh.to(tl.int64) * n_split + pid_s) * G + offs_g  # rows of [B*H, S, G]
    tl.store(MO + row, m_i, mask=gmask)
    tl.store(LO + row, l_i, mask=gmask)
    tl.store(AO + row[:, None] * DV + offs_dv[None, :], acc, mask=gmask[:, None] & dvmask[None, :])


def choose_splits(nq: int, bh: int, sms: int, config: CoupledKernelConfig = DEFAULT_CONFIG) -> tuple[int, int]:
    """:func:`squeezekv.channel.triton_common.choose_splits` with ``config``'s tokens per block and programs per
    multiprocessor."""
    return _common.choose_splits(nq, bh, sms, config.block_n, config.programs_per_sm)


def decode_state(
    q: torch.Tensor,
    kcode: torch.Tensor,
    vcode: torch.Tensor,
    kbook: torch.Tensor,
    vbook: torch.Tensor,
    scaling: float,
    splits: int | None = None,
    config: CoupledKernelConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online-softmax state of one query token per query head over ``nq`` CQ-quantised positions.

    ``q`` ``[B, H, G, D]`` (the ``G`` query heads of each KV head); ``kcode``/``vcode``
    ``[B, H, nq, (D / c) * w / 8]`` uint8; ``kbook``/``vbook`` ``[H, D / c, 2**w, c]`` (``c`` channels per group,
    ``w`` bits per code; cast to the query's dtype unless already in it). ``splits``: number of token splits (default
    :func:`choose_splits`); ``config``: the launch settings (:class:`~squeezekv.channel.kernels.CoupledKernelConfig`:
    tokens per block, warps, programs per multiprocessor aimed at when ``splits`` is None (fewer: fewer heads'
    codebooks competing for its L1), vector gathers (only for ``c >= 2``; same values either way), pipelining
    stages (each holds a block's gathered centroids in shared memory, which the L1 that caches the codebooks gives
    up)). Returns float32 ``(max [B, H, G],
    sum [B, H, G], acc [B, H, G, Dv])`` with ``sum = sum_p exp(logit_p - max)``, ``acc = sum_p exp(logit_p - max)
    v_p``."""
    b, h, g, d = q.shape
    nq = kcode.shape[2]
    hb, ng, k, c = kbook.shape
    width = k.bit_length() - 1
    dv = vbook.shape[1] * vbook.shape[3]
    block_n = config.block_n
    if nq == 0:
        raise ValueError("decode_state needs at least one quantised position")
    if k != 1 << width or hb != h or ng * c != d or tuple(vbook.shape[::2]) != (h, k) or vbook.shape[3] != c:
        raise ValueError(f"codebooks {tuple(kbook.shape)} / {tuple(vbook.shape)} do not match queries "
                         f"{tuple(q.shape)} (need [H, D / c, 2**w, c])")
    if kcode.shape[-1] * 8 != ng * width or vcode.shape[-1] * 8 != dv // c * width:
        raise ValueError(f"codes of {kcode.shape[-1]} / {vcode.shape[-1]} bytes do not hold {ng} / {dv // c} codes "
                         f"of {width} bits")
    why = supports(q.device, d, dv, width, c, q.dtype)
    if why is not None:
        raise ValueError(f"the fused CQ kernel cannot run: {why}")
    if splits is None:
        splits, split_len = choose_splits(nq, b * h, _sms(q.device), config)
    else:
        split_len = math.ceil(math.ceil(nq / max(1, splits)) / block_n) * block_n
        splits = math.ceil(nq / split_len)
    q = q.contiguous()
    kcode, vcode = (t if t.stride(-1) == 1 else t.contiguous() for t in (kcode, vcode))
    # the model's dtype (what the reference path rounds a looked-up key/value to): half the bytes of float32
    kbook, vbook = (t.to(q.dtype).contiguous() for t in (kbook, vbook))
    f32 = dict(device=q.device, dtype=torch.float32)
    m_part = torch.empty((b * h, splits, g), **f32)
    l_part = torch.empty_like(m_part)
    a_part = torch.empty((b * h, splits, g, dv), **f32)
    upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu"  # CPU = interpreter
    num_stages = config.stages_for(b * h)
    stages = {} if num_stages is None else {"num_stages": num_stages}
    _split_kernel[(b * h, splits)](
        q, kcode, vcode, kbook, vbook, m_part, l_part, a_part,
        nq, h, split_len, float(scaling),
        *kcode.stride()[:3], *vcode.stride()[:3],
        G=g, D=d, DV=dv, C=c, W=width,
        BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_D=triton.next_power_of_2(d),
        BLOCK_DV=triton.next_power_of_2(dv), BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 or upcast else None, UPCAST=upcast,
        VEC=config.vector and c >= 2, num_warps=config.num_warps, **stages,
    )
    return _common.merge_states(m_part, l_part, a_part, b, h, g, dv, splits)
