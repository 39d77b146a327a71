"""What the fused decoding kernels of KIVI (:mod:`squeezekv.channel.kivi_triton`) and CQ
(:mod:`squeezekv.channel.coupled_triton`) share: the split-K layout's choice of splits, the kernel that merges the
splits' online-softmax states, and the interpreter switch.

Split-K (flash-decoding): the grid is ``(B * H, S)``; each program walks ``split_len`` quantised positions of one
(row, KV head) and writes a partial state ``(max, sum, acc)`` in float32 to ``[B * H, S, G]`` / ``[B * H, S, G, Dv]``
buffers; :func:`merge_states` combines the ``S`` partial states of each (row, KV head, query head).

Imports ``triton``; with ``TRITON_INTERPRET=1`` set before it is imported, the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

#: multiprocessors assumed off CUDA (the interpreter): an H100/H200
DEFAULT_SMS = 132


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (:data:`DEFAULT_SMS` off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def choose_splits(nq: int, bh: int, sms: int, block_n: int, programs_per_sm: int) -> tuple[int, int]:
    """``(splits, tokens per split)``: enough programs (``B * H * splits``) for about ``programs_per_sm`` per
    multiprocessor, each split a whole number of ``block_n``-token blocks and none empty."""
    blocks = max(1, math.ceil(nq / block_n))
    want = max(1, math.ceil(programs_per_sm * sms / max(1, bh)))
    split_len = math.ceil(blocks / min(blocks, want)) * block_n
    return math.ceil(nq / split_len), split_len


@triton.jit
def merge_kernel(MO, LO, AO, M, L, A, S, G: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_DV: tl.constexpr):
    # one program per (row, KV head, query head): merge the S partial states, BLOCK_S splits at a time (a fixed
    # block: a growing split count never compiles a new variant)
    pid = tl.program_id(0)
    bh = pid // G
    g = pid % G
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    base = bh.to(tl.int64) * S
    m_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        smask = s0 + offs_s < S
        m_max = tl.maximum(m_max, tl.load(MO + (base + s0 + offs_s) * G + g, mask=smask, other=float("-inf")))
    m_tot = tl.max(m_max, 0)
    l_tot = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        smask = s0 + offs_s < S
        row = (base + s0 + offs_s) * G + g  # [BLOCK_S] rows of [B*H, S, G]
        w = tl.exp(tl.load(MO + row, mask=smask, other=float("-inf")) - m_tot)  # 0 for the padding
        l_tot += tl.load(LO + row, mask=smask, other=0.0) * w
        a = tl.load(AO + row[:, None] * DV + offs_dv[None, :], mask=smask[:, None] & (offs_dv[None, :] < DV),
                    other=0.0)
        acc += tl.sum(a * w[:, None], 0)
    out = pid.to(tl.int64)
    tl.store(M + out, m_tot)
    tl.store(L + out, tl.sum(l_tot, 0))
    tl.store(A + out * DV + offs_dv, acc, mask=offs_dv < DV)


def merge_states(m_part: torch.Tensor, l_part: torch.Tensor, a_part: torch.Tensor, b: int, h: int, g: int,
                 dv: int, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``splits`` partial states ``[B * H, S, G]`` (max, sum) and ``[B * H, S, G, Dv]`` (acc) merged into
    float32 ``(max [B, H, G], sum [B, H, G], acc [B, H, G, Dv])``."""
    f32 = dict(device=m_part.device, dtype=torch.float32)
    m = torch.empty((b, h, g), **f32)
    l_sum = torch.empty_like(m)
    acc = torch.empty((b, h, g, dv), **f32)
    merge_kernel[(b * h * g,)](m_part, l_part, a_part, m, l_sum, acc, splits, G=g, DV=dv, BLOCK_S=16,
                               BLOCK_DV=triton.next_power_of_2(dv), num_warps=4)
    return m, l_sum, acc
