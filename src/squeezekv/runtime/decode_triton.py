"""Triton split-K flash-decoding over a KV pool with per-(row, KV head) lengths, GQA-grouped.

Grid ``(B * Hkv, S)``: program ``(bh, s)`` loads the row's slot ``slots[b]`` and its fill count ``n = lengths[b, h]``
and walks the entries ``[s * L, min((s + 1) * L, n))`` of that (slot, KV head) in blocks of ``BLOCK_N``; each block of
keys/values is read once for the ``G = Hq / Hkv`` query heads of the group (``tl.dot`` with the query heads padded to
16 rows). An online softmax (running max and sum, float32) accumulates ``P V``. A split past ``n`` does no work and
writes the empty state (max -inf, sum 0), which the merge weighs by 0.

``S`` (and ``L``) depend only on the pool's capacity ``C`` and on ``B * Hkv`` (:func:`choose_splits` of the KIVI
kernels), never on the lengths: a batch bucket always launches the same grid, so the step can be captured as a CUDA
graph. With ``S == 1`` the split kernel normalises and writes the output itself (one launch); else a second small
kernel merges the ``S`` partial states per (row, KV head, query head) and writes the output in the query's dtype.

H2O: with ``scores``, the split kernel also writes its scaled logits (float32 ``[B * Hkv, G, C]``, a few percent of
the keys' bytes) and a third kernel turns them into the normalised weights, summed over the query group, and adds
them to ``scores[slot, h, :n]`` (every entry belongs to one program: no atomics) -- the keys are read once a step.

Numerics: bf16/fp16 products on tensor cores with float32 accumulation (the weights are cast to the inputs' dtype
before ``P V``, as flash attention does); float32 inputs use IEEE float32 products (no TF32). In the CPU interpreter
bfloat16 products are computed in float32 (its bfloat16 ``tl.dot`` is wrong).

With ``TRITON_INTERPRET=1`` set before this module is imported, the kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..channel.triton_common import choose_splits, interpreting, sms

#: entries per block of a program's loop (float32 inputs: half, to keep shared memory under 100 KiB at head dim 128),
#: warps per program, programs aimed at per multiprocessor (not tuned on a GPU)
BLOCK_N = 64
NUM_WARPS = 4
PROGRAMS_PER_SM = 4
#: entries per program of H2O's scores kernel (one block each: all blocks of all rows run at once)
SCORES_BLOCK_N = 256


def supports(q: torch.Tensor) -> str | None:
    """None if the kernel can run for queries ``q``, else the reason it cannot."""
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        return f"the query is on {q.device.type}: the kernel needs a CUDA device (or TRITON_INTERPRET=1 on CPU)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if q.device.type == "cuda" and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "bfloat16 products need a GPU of compute capability 8.0 or newer"
    return None


def default_block_n(dtype: torch.dtype) -> int:
    """Entries per block: :data:`BLOCK_N` for 16-bit inputs, half of it for float32."""
    return BLOCK_N // 2 if dtype == torch.float32 else BLOCK_N


@triton.jit
def _row_head(Q, SLOTS, LENS, pid_bh, H, sl_b, sl_h, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
              BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """What a (row, KV head) program starts from: the head ``h``, the row's pool ``slot``, its fill count ``n`` and
    the G query heads of this KV head ``[BLOCK_G, BLOCK_D]`` (padded rows/channels are 0)."""
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)
    slot = tl.load(SLOTS + b).to(tl.int64)
    n = tl.load(LENS + b * sl_b + h * sl_h)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + pid_bh.to(tl.int64) * (G * D) + offs_g[:, None] * D + offs_d[None, :],
                mask=(offs_g < G)[:, None] & (offs_d < D)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return h, slot, n, q


@triton.jit
def _split_kernel(Q, K, V, SLOTS, LENS, MO, LO, AO, OUT, LG,
                  H, split_len, scale, C,
                  sk_s, sk_h, sk_n, sv_s, sv_h, sv_n, sl_b, sl_h,
                  G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SINGLE: tl.constexpr,
                  SAVE_LOGITS: tl.constexpr = False):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    h, slot, n, q = _row_head(Q, SLOTS, LENS, pid_bh, H, sl_b, sl_h, G, D, BLOCK_G, BLOCK_D, UPCAST)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    gmask = offs_g < G
    dmask = offs_d < D
    k_ptr = K + slot * sk_s + h * sk_h
    v_ptr = V + slot * sv_s + h * sv_h
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, n)
    for n0 in range(start, end, BLOCK_N):  # every block holds at least one filled entry
        pos = n0 + offs_n  # [BLOCK_N]
        nmask = pos < end
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + pos[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N] float32
        if SAVE_LOGITS:  # H2O: the scores kernel reads these instead of the keys again
            tl.store(LG + (pid_bh.to(tl.int64) * G + offs_g)[:, None] * C + pos[None, :], s,
                     mask=gmask[:, None] & nmask[None, :])
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + pos[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m_i = m_new
    row = (pid_bh.to(tl.int64) * n_split + pid_s) * G + offs_g  # rows of [B*H, S, G]
    tl.store(MO + row, m_i, mask=gmask)
    tl.store(LO + row, l_i, mask=gmask)
    if SINGLE:  # one split: this is the whole state, write the output
        out = acc / l_i[:, None]
        tl.store(OUT + (pid_bh.to(tl.int64) * G + offs_g)[:, None] * D + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:
        tl.store(AO + row[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _merge_kernel(MO, LO, AO, M, L, OUT, S, G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    # one program per (row, KV head, query head): merge its S partial states, BLOCK_S at a time
    pid = tl.program_id(0)
    bh = pid // G
    g = pid % G
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    base = bh.to(tl.int64) * S
    m_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        smask = s0 + offs_s < S
        m_max = tl.maximum(m_max, tl.load(MO + (base + s0 + offs_s) * G + g, mask=smask, other=float("-inf")))
    m_tot = tl.max(m_max, 0)  # finite: split 0 holds at least one entry
    l_tot = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        smask = s0 + offs_s < S
        row = (base + s0 + offs_s) * G + g
        w = tl.exp(tl.load(MO + row, mask=smask, other=float("-inf")) - m_tot)  # 0 for empty splits
        l_tot += tl.load(LO + row, mask=smask, other=0.0) * w
        a = tl.load(AO + row[:, None] * D + offs_d[None, :], mask=smask[:, None] & (offs_d[None, :] < D), other=0.0)
        acc += tl.sum(a * w[:, None], 0)
    l_sum = tl.sum(l_tot, 0)
    out = pid.to(tl.int64)
    tl.store(M + out, m_tot)
    tl.store(L + out, l_sum)
    tl.store(OUT + out * D + offs_d, (acc / l_sum).to(OUT.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _scores_kernel(LG, SLOTS, LENS, M, L, SC, H, C, sl_b, sl_h, ss_s, ss_h,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    # H2O: add the normalised weights exp(s - m) / l, summed over the query group, to the slot's scores; s: the
    # logits the split kernel saved [B * H, G, C]. One program per (row, KV head) and block of BLOCK_N entries, no
    # loop: a loop over the entries of a split waits on one dependent load after another
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)
    n = tl.load(LENS + b * sl_b + h * sl_h)
    start = pid_n * BLOCK_N
    if start < n:
        slot = tl.load(SLOTS + b).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        pos = start + tl.arange(0, BLOCK_N)
        gmask = offs_g < G
        nmask = pos < n
        m = tl.load(M + pid_bh.to(tl.int64) * G + offs_g, mask=gmask, other=0.0)
        inv_l = tl.where(gmask, 1.0 / tl.load(L + pid_bh.to(tl.int64) * G + offs_g, mask=gmask, other=1.0), 0.0)
        lg_ptr = LG + (pid_bh.to(tl.int64) * G + offs_g)[:, None] * C
        sc_ptr = SC + slot * ss_s + h * ss_h
        s = tl.load(lg_ptr + pos[None, :], mask=gmask[:, None] & nmask[None, :], other=0.0)  # [BLOCK_G, BLOCK_N]
        w = tl.sum(tl.exp(s - m[:, None]) * inv_l[:, None], 0)  # [BLOCK_N]
        old = tl.load(sc_ptr + pos, mask=nmask, other=0.0)
        tl.store(sc_ptr + pos, old + w, mask=nmask)


@triton.jit
def _write_kernel(KN, VN, K, V, POS, SC, SLOTS, LENS, SEEN, NEW_LENS,
                  H, skn_b, skn_h, svn_b, svn_h, sk_s, sk_h, sk_n, sv_s, sv_h, sv_n, sp_s, sp_h, ss_s, ss_h,
                  sl_s, sl_h, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SCORES: tl.constexpr):
    # one program per (row, KV head): append the row's new key/value at entry n = LENS[slot, h] of its slot, with
    # its logical position SEEN[slot] (and a zero score), and write n + 1 to NEW_LENS[row, h]
    pid = tl.program_id(0)
    b = pid // H
    h = (pid % H).to(tl.int64)
    slot = tl.load(SLOTS + b).to(tl.int64)
    n = tl.load(LENS + slot * sl_s + h * sl_h).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    k = tl.load(KN + b.to(tl.int64) * skn_b + h * skn_h + offs_d, mask=dmask)
    v = tl.load(VN + b.to(tl.int64) * svn_b + h * svn_h + offs_d, mask=dmask)
    tl.store(K + slot * sk_s + h * sk_h + n * sk_n + offs_d, k, mask=dmask)
    tl.store(V + slot * sv_s + h * sv_h + n * sv_n + offs_d, v, mask=dmask)
    tl.store(POS + slot * sp_s + h * sp_h + n, tl.load(SEEN + slot).to(tl.int32))
    if HAS_SCORES:
        tl.store(SC + slot * ss_s + h * ss_h + n, 0.0)
    tl.store(NEW_LENS + pid, (n + 1).to(tl.int32))


def pool_write(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
               positions: torch.Tensor, scores: torch.Tensor | None, lengths: torch.Tensor, seen: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
    """:meth:`squeezekv.runtime.pool.KVPool.write` in one launch (shapes checked there): ``k_new``/``v_new``
    ``[B, H, 1, D]`` go to entry ``lengths[slots[b], h]`` of ``k_pool``/``v_pool`` ``[S, H, C, D]``; returns the
    lengths after the write ``[B, H]`` int32."""
    b, h, _, d = k_new.shape
    if k_new.stride(-1) != 1:
        k_new = k_new.contiguous()
    if v_new.stride(-1) != 1:
        v_new = v_new.contiguous()
    new_lens = torch.empty((b, h), device=k_new.device, dtype=torch.int32)
    sc = positions if scores is None else scores  # not read without scores
    _write_kernel[(b * h,)](
        k_new, v_new, k_pool, v_pool, positions, sc, slots, lengths, seen, new_lens,
        h, k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        positions.stride(0), positions.stride(1), sc.stride(0), sc.stride(1), lengths.stride(0), lengths.stride(1),
        D=d, BLOCK_D=triton.next_power_of_2(d), HAS_SCORES=scores is not None, num_warps=1)
    return new_lens


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float, *, scores: torch.Tensor | None = None,
                     splits: int | None = None, block_n: int | None = None,
                     num_warps: int = NUM_WARPS) -> torch.Tensor:
    """:func:`squeezekv.runtime.decode_attention.decode_attention` by the kernels (shapes checked there).
    ``splits``: number of token splits (default: :func:`choose_splits` for about :data:`PROGRAMS_PER_SM` programs per
    multiprocessor); ``block_n``: entries per block (a power of two >= 16; default :func:`default_block_n`)."""
    if block_n is None:
        block_n = default_block_n(q.dtype)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} is out of range: must be a power of two >= 16")
    b, hq, _, d = q.shape
    h, c = k_pool.shape[1], k_pool.shape[2]
    g = hq // h
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or (scores is not None and scores.stride(-1) != 1):
        raise ValueError("k_pool, v_pool (and scores) must be contiguous in their last dimension")
    if splits is None:
        splits, split_len = choose_splits(c, b * h, sms(q.device), block_n, PROGRAMS_PER_SM)
    else:
        if not isinstance(splits, int) or splits < 1:
            raise ValueError(f"splits={splits!r} is out of range: must be an integer >= 1")
        split_len = math.ceil(math.ceil(c / splits) / block_n) * block_n  # whole blocks
        splits = math.ceil(c / split_len)
    qc = q.reshape(b, h, g, d).contiguous()  # [B, H, G, D]
    out = torch.empty((b, h, g, d), device=q.device, dtype=q.dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    m_part = torch.empty((b * h, splits, g), **f32)
    l_part = torch.empty_like(m_part)
    a_part = m_part if splits == 1 else torch.empty((b * h, splits, g, d), **f32)
    upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu"  # CPU = interpreter
    blocks = dict(G=g, D=d, BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_D=max(16, triton.next_power_of_2(d)),
                  BLOCK_N=block_n, PRECISION="ieee" if q.dtype == torch.float32 or upcast else None, UPCAST=upcast)
    lens = lengths.to(torch.int32)
    slot_idx = slots.to(torch.int64)
    logits = m_part if scores is None else torch.empty((b * h, g, c), **f32)  # [B*H, G, C]: H2O's logits
    _split_kernel[(b * h, splits)](
        qc, k_pool, v_pool, slot_idx, lens, m_part, l_part, a_part, out, logits, h, split_len, float(scale), c,
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        lens.stride(0), lens.stride(1), SINGLE=splits == 1, SAVE_LOGITS=scores is not None, num_warps=num_warps,
        **blocks)
    if splits == 1:
        m, l_sum = m_part, l_part  # [B*H, 1, G]: the whole state
    else:
        m = torch.empty((b * h, g), **f32)
        l_sum = torch.empty_like(m)
        _merge_kernel[(b * h * g,)](m_part, l_part, a_part, m, l_sum, out, splits, G=g, D=d, BLOCK_S=16,
                                    BLOCK_D=blocks["BLOCK_D"], num_warps=4)
    if scores is not None:
        _scores_kernel[(b * h, triton.cdiv(c, SCORES_BLOCK_N))](
            logits, slot_idx, lens, m, l_sum, scores, h, c, lens.stride(0), lens.stride(1),
            scores.stride(0), scores.stride(1), G=g, BLOCK_G=blocks["BLOCK_G"], BLOCK_N=SCORES_BLOCK_N,
            num_warps=num_warps)
    return out.reshape(b, hq, 1, d)
