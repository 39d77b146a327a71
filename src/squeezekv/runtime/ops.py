"""The runtime's Triton kernels as PyTorch custom operators (``torch.library.custom_op``), so that a decode step
compiled with ``torch.compile`` (``DecodeRuntime(compile=True)``) treats each launch as one opaque in-place call
(what it reads and writes is declared) instead of tracing the launcher, and eager steps call them the same way.

* ``squeezekv::runtime_decode_attention`` / ``squeezekv::runtime_decode_attention_scores`` (mutates ``scores``:
  H2O): :func:`squeezekv.runtime.decode_triton.decode_attention`;
* ``squeezekv::runtime_kivi_attention``: :func:`squeezekv.channel.kivi_triton.pool_decode_attend` (a KIVI pool);
* ``squeezekv::runtime_pool_write`` / ``squeezekv::runtime_pool_write_scores``:
  :func:`squeezekv.runtime.decode_triton.pool_write` (mutates the layer's keys, values, positions, and scores).

A mutated argument of a custom operator must not be optional: inductor fails on one that is None
(``getitem is not an OpOverload``, torch 2.11-2.13), so each kernel has an operator with and one without scores;
:func:`decode_attention` and :func:`pool_write` pick one. Importing this module imports triton.
"""

from __future__ import annotations

import torch

from . import decode_triton


@torch.library.custom_op("squeezekv::runtime_decode_attention", mutates_args=())
def _attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
               lengths: torch.Tensor, scale: float) -> torch.Tensor:
    return decode_triton.decode_attention(q, k_pool, v_pool, slots, lengths, scale)


@torch.library.custom_op("squeezekv::runtime_decode_attention_scores", mutates_args=("scores",))
def _attention_scores(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                      lengths: torch.Tensor, scale: float, scores: torch.Tensor) -> torch.Tensor:
    return decode_triton.decode_attention(q, k_pool, v_pool, slots, lengths, scale, scores=scores)


@_attention.register_fake
def _(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
      scale: float) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@_attention_scores.register_fake
def _(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
      scale: float, scores: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float, scores: torch.Tensor | None) -> torch.Tensor:
    """``[B, Hq, 1, D]``: see :func:`squeezekv.runtime.decode_attention.decode_attention`."""
    if scores is None:
        return _attention(q, k_pool, v_pool, slots, lengths, scale)
    return _attention_scores(q, k_pool, v_pool, slots, lengths, scale, scores)


@torch.library.custom_op("squeezekv::runtime_pool_write", mutates_args=("k_pool", "v_pool", "positions"))
def _write(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
           positions: torch.Tensor, lengths: torch.Tensor, seen: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return decode_triton.pool_write(k_new, v_new, k_pool, v_pool, positions, None, lengths, seen, slots)


@torch.library.custom_op("squeezekv::runtime_pool_write_scores",
                         mutates_args=("k_pool", "v_pool", "positions", "scores"))
def _write_scores(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  positions: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor, seen: torch.Tensor,
                  slots: torch.Tensor) -> torch.Tensor:
    return decode_triton.pool_write(k_new, v_new, k_pool, v_pool, positions, scores, lengths, seen, slots)


@_write.register_fake
def _(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, positions: torch.Tensor,
      lengths: torch.Tensor, seen: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return k_new.new_empty(k_new.shape[:2], dtype=torch.int32)


@_write_scores.register_fake
def _(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, positions: torch.Tensor,
      scores: torch.Tensor, lengths: torch.Tensor, seen: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return k_new.new_empty(k_new.shape[:2], dtype=torch.int32)


def pool_write(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
               positions: torch.Tensor, scores: torch.Tensor | None, lengths: torch.Tensor, seen: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
    """``[B, H]`` int32 lengths after the write: see :meth:`squeezekv.runtime.pool.KVPool.write`."""
    if scores is None:
        return _write(k_new, v_new, k_pool, v_pool, positions, lengths, seen, slots)
    return _write_scores(k_new, v_new, k_pool, v_pool, positions, scores, lengths, seen, slots)


@torch.library.custom_op("squeezekv::runtime_kivi_attention", mutates_args=())
def kivi_attention(q: torch.Tensor, kcode: torch.Tensor, vcode: torch.Tensor, kscale: torch.Tensor,
                   kzero: torch.Tensor, vscale: torch.Tensor, vzero: torch.Tensor, slots: torch.Tensor,
                   nq: torch.Tensor, rkeys: torch.Tensor, rvalues: torch.Tensor, lengths: torch.Tensor, bits: int,
                   group_size: int, scale: float) -> torch.Tensor:
    """``[B, H, G, D]``: :func:`squeezekv.channel.kivi_triton.pool_decode_attend` (a KIVI pool's decode attention)."""
    from ..channel import kivi_triton

    return kivi_triton.pool_decode_attend(q, kcode, vcode, kscale, kzero, vscale, vzero, slots, nq, rkeys, rvalues,
                                          lengths.to(torch.int32), bits, group_size, scale)


@kivi_attention.register_fake
def _(q: torch.Tensor, kcode: torch.Tensor, vcode: torch.Tensor, kscale: torch.Tensor, kzero: torch.Tensor,
      vscale: torch.Tensor, vzero: torch.Tensor, slots: torch.Tensor, nq: torch.Tensor, rkeys: torch.Tensor,
      rvalues: torch.Tensor, lengths: torch.Tensor, bits: int, group_size: int, scale: float) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
