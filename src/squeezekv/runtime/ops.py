"""The runtime's Triton kernels as PyTorch custom operators (``torch.library.custom_op``), so that a decode step
compiled with ``torch.compile`` (``DecodeRuntime(compile=True)``) treats each launch as one opaque in-place call
(what it reads and writes is declared) instead of tracing the launcher, and eager steps call them the same way.

* ``squeezekv::runtime_decode_attention``: :func:`squeezekv.runtime.decode_triton.decode_attention` (mutates
  ``scores`` when given: H2O);
* ``squeezekv::runtime_pool_write``: :func:`squeezekv.runtime.decode_triton.pool_write` (mutates the layer's keys,
  values, positions and scores).

Importing this module imports triton.
"""

from __future__ import annotations

import torch

from . import decode_triton


@torch.library.custom_op("squeezekv::runtime_decode_attention", mutates_args=("scores",))
def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float, scores: torch.Tensor | None) -> torch.Tensor:
    """``[B, Hq, 1, D]``: see :func:`squeezekv.runtime.decode_attention.decode_attention`."""
    return decode_triton.decode_attention(q, k_pool, v_pool, slots, lengths, scale, scores=scores)


@decode_attention.register_fake
def _(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
      scale: float, scores: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("squeezekv::runtime_pool_write", mutates_args=("k_pool", "v_pool", "positions", "scores"))
def pool_write(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
               positions: torch.Tensor, scores: torch.Tensor | None, lengths: torch.Tensor, seen: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
    """``[B, H]`` int32 lengths after the write: see :meth:`squeezekv.runtime.pool.KVPool.write`."""
    return decode_triton.pool_write(k_new, v_new, k_pool, v_pool, positions, scores, lengths, seen, slots)


@pool_write.register_fake
def _(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, positions: torch.Tensor,
      scores: torch.Tensor | None, lengths: torch.Tensor, seen: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return k_new.new_empty(k_new.shape[:2], dtype=torch.int32)
