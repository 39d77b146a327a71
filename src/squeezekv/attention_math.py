"""Attention maths shared by the attention function (:mod:`squeezekv.attention`) and the layers
(:mod:`squeezekv.cache`, the channel and cross-layer layers): masks, softmaxed weights in query chunks, eager and SDPA
attention over a layer's held keys/values. Pure tensor functions: this module imports neither the cache nor the
attention function, so both can import it.

Shapes: query ``[B, Hq, q, D]``, key/value ``[B, Hkv, n, D]`` (``Hq`` a multiple of ``Hkv``: query heads of one group
share a KV head), boolean masks ``allowed`` ``[B|1, Hkv|1, q, n]`` (True = the query may see that key; None = plain
causal, the q queries being the last q of the n keys).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

#: largest float32 attention-weight block materialised at once by the eager path (elements); read at call time
EAGER_BLOCK = 1 << 26


def expand_heads(mask: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[B, Hkv|1, q, n] -> [B, Hq|1, q, n] (query heads of a group share their KV head's mask)."""
    b, h, q, n = mask.shape
    if h == 1:
        return mask
    group = num_q_heads // h
    return mask[:, :, None].expand(b, h, group, q, n).reshape(b, num_q_heads, q, n)


def no_empty_rows(allowed: torch.Tensor) -> torch.Tensor:
    """``allowed`` ``[..., q, n]`` where a query that may see nothing sees everything instead.

    A padding query of a left-padded prompt sees only padding: letting it see everything avoids NaN (its output is
    never used, and NaN would leak through 0 * NaN in the value product)."""
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def causal(q_len: int, n: int, device: torch.device, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Rows ``start:end`` of the ``[q, n]`` causal mask where the q new queries are the last q of n contiguous
    tokens."""
    end = q_len if end is None else end
    rows = torch.arange(n - q_len + start, n - q_len + end, device=device)  # [end - start]
    return torch.arange(n, device=device)[None, :] <= rows[:, None]  # [end - start, n]


def weight_chunks(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None, scaling: float
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Softmaxed attention weights, a chunk of queries at a time: ``(start, end, [B, Hkv, G, end - start, m])``.

    query ``[B, Hq, q, D]``, key ``[B, Hkv, n, D]``, allowed ``[B, Hkv|1, q, n]`` or None (causal). In the causal
    layout a chunk's weights stop at its last query's own key (``m <= n``; the keys after it get no weight). Logits
    are computed in the inputs' dtype (tensor cores for bf16/fp16), softmax in float32. A chunk holds at most about
    :data:`EAGER_BLOCK` weights."""
    b, hq, q_len, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    qg = query.reshape(b, hkv, hq // hkv, q_len, d)  # [B, Hkv, G, q, D]: query heads of one KV head side by side
    chunk = max(1, EAGER_BLOCK // max(1, b * hq * n))
    for start in range(0, q_len, chunk):
        end = min(q_len, start + chunk)
        m = n if allowed is not None else n - q_len + end  # keys any query of the chunk may see
        logits = torch.einsum("bhgqd,bhnd->bhgqn", qg[:, :, :, start:end], key[:, :, :m]).float() * scaling
        if allowed is not None:
            logits = logits.masked_fill(~allowed[:, :, None, start:end, :], float("-inf"))
        elif q_len > 1:
            logits = logits.masked_fill(~causal(q_len, n, key.device, start, end)[:, :m], float("-inf"))
        yield start, end, logits.softmax(dim=-1)  # [B, Hkv, G, end - start, m]


def eager(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Eager attention in query chunks (:func:`weight_chunks`); weights and products in float32. Returns
    ``[B, Hq, q, Dv]`` in the query's dtype."""
    b, hq, q_len, d = query.shape
    vf = value.float()  # [B, Hkv, n, Dv]
    outs = [torch.einsum("bhgqn,bhnd->bhgqd", w, vf[:, :, : w.shape[-1]])  # [B, Hkv, G, chunk, Dv]
            for _, _, w in weight_chunks(query, key, allowed, scaling)]
    return torch.cat(outs, dim=3).reshape(b, hq, q_len, value.shape[-1]).to(query.dtype)


def sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None, scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """SDPA over ``[B, Hq, q, D]`` queries and ``[B, Hkv, n, D]`` keys/values; ``allowed`` ``[B|1, Hkv|1, q, n]``.
    Returns ``[B, Hq, q, Dv]``."""
    b, hq, q_len, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    if allowed is not None and q_len == 1 and hq != hkv:
        # One decoding query per head with a mask: put the query heads of a KV group on the sequence axis
        # ([B, Hkv, G, D]) so the mask broadcasts over them and no kernel has to expand K/V to every query head.
        out = F.scaled_dot_product_attention(
            query.reshape(b, hkv, hq // hkv, d), key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling
        )  # [B, Hkv, G, Dv]
        return out.reshape(b, hq, 1, value.shape[-1])
    gqa = hq != hkv
    if allowed is None:
        if q_len == 1:
            mask, is_causal = None, False
        elif q_len == n:
            mask, is_causal = None, True
        else:  # the q queries are the last q of n keys (a chunk after a kept past): flash/efficient kernels apply
            mask, is_causal = causal_lower_right(q_len, n), False
    else:
        mask, is_causal = expand_heads(allowed, hq), False  # [B|1, Hq|1, q, n]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, dropout_p=dropout, scale=scaling, enable_gqa=gqa
    )


__all__ = ["EAGER_BLOCK", "causal", "eager", "expand_heads", "no_empty_rows", "sdpa", "weight_chunks"]
