"""Decode attention over a KV pool: each batch row's query group attends to only the first ``lengths[b, h]`` entries
of its slot, per KV head.

Two paths compute the same thing: the PyTorch reference (:func:`reference_decode_attention`, CPU and fallback: the
rows' slots are gathered and masked) and the Triton split-K flash-decoding kernel of :mod:`.decode_triton` (CUDA, or
the CPU interpreter with ``TRITON_INTERPRET=1``), which reads only the filled entries. Both are CUDA-graph safe: no
host synchronisation, shapes fixed by the batch and the pool's capacity.

For H2O the caller passes ``scores`` (the pool layer's ``[S, Hkv, C]`` float32 scores): each step's softmax weights,
summed over the query heads of a KV group, are added to the rows' slots, as the eager path accumulates them.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

#: values of ``backend``
BACKENDS = ("auto", "torch", "triton")


def _check(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
           lengths: torch.Tensor, scores: torch.Tensor | None) -> None:
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q has shape {tuple(q.shape)}: decode attention takes one query per row, [B, Hq, 1, D]")
    if k_pool.dim() != 4 or v_pool.shape[:3] != k_pool.shape[:3]:
        raise ValueError(f"k_pool {tuple(k_pool.shape)} / v_pool {tuple(v_pool.shape)} must be [S, Hkv, C, D] alike")
    b, hq, _, d = q.shape
    h = k_pool.shape[1]
    if hq % h or k_pool.shape[-1] != d:
        raise ValueError(f"{hq} query heads of dim {d} do not group over {h} KV heads of dim {k_pool.shape[-1]}")
    if slots.shape != (b,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an integer tensor [B={b}], got {slots.dtype} {tuple(slots.shape)}")
    if lengths.shape != (b, h) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be an integer tensor [B={b}, Hkv={h}], got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if scores is not None and (scores.shape != k_pool.shape[:3] or scores.dtype != torch.float32):
        raise ValueError(f"scores must be float32 {tuple(k_pool.shape[:3])}, got {scores.dtype} {tuple(scores.shape)}")


def reference_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                               lengths: torch.Tensor, scale: float,
                               scores: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch path of :func:`decode_attention`: logits in the inputs' dtype, softmax and the value product in
    float32 (as squeezekv's eager attention computes them)."""
    c = k_pool.shape[2]
    filled = torch.arange(c, device=q.device) < lengths[..., None]  # [B, H, C]
    out, weights = masked_decode(q, k_pool.index_select(0, slots), v_pool.index_select(0, slots), filled, scale)
    if scores is not None:
        scores.index_add_(0, slots, weights.sum(dim=2))  # [B, H, C] onto the rows' slots
    return out


def masked_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, filled: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` ``[B, Hq, 1, D]`` over the ``filled`` ``[B, H, N]`` entries of ``keys``/``values``
    ``[B, H, N, D]``: logits in the inputs' dtype, softmax and the value product in float32. Returns the output
    ``[B, Hq, 1, D]`` in ``q``'s dtype and the weights ``[B, H, G, N]`` (float32)."""
    b, hq, _, d = q.shape
    h = keys.shape[1]
    qg = q.reshape(b, h, hq // h, d)  # [B, H, G, D]: the query heads of one KV head
    logits = torch.einsum("bhgd,bhnd->bhgn", qg, keys).float() * scale  # [B, H, G, N]
    weights = logits.masked_fill(~filled[:, :, None], float("-inf")).softmax(dim=-1)  # [B, H, G, N]
    values = values.float().masked_fill(~filled[..., None], 0.0)  # unfilled entries are never read, even if NaN
    out = torch.einsum("bhgn,bhnd->bhgd", weights, values)  # [B, H, G, D]
    return out.reshape(b, hq, 1, d).to(q.dtype), weights


#: whether triton is importable, decided once (a compiled step must not call the import machinery)
_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON


def kernel_supports(q: torch.Tensor) -> str | None:
    """None if the Triton kernel can run for these queries, else why not."""
    if not triton_available():
        return "triton is not importable (pip install 'squeezekv[gpu]')"
    return importlib.import_module(f"{__package__}.decode_triton").supports(q)


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float, *, scores: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Attention of one query per row over the filled entries of each row's pool slot.

    ``q`` ``[B, Hq, 1, D]``; ``k_pool``/``v_pool`` ``[S, Hkv, C, D]``; ``slots`` ``[B]`` (the pool row of each batch
    row); ``lengths`` ``[B, Hkv]`` entries in ``1..C`` to attend to (not checked on the device: no host sync);
    ``scores``: ``[S, Hkv, C]`` float32 that the softmax weights (summed over each KV head's query group) are added
    to. ``backend``: ``"auto"`` (the Triton kernel on CUDA when triton is importable, else the reference),
    ``"torch"`` or ``"triton"`` (raises ``ValueError`` when it cannot run). Returns ``[B, Hq, 1, D]`` in ``q``'s dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is out of range: choose one of {BACKENDS}")
    _check(q, k_pool, v_pool, slots, lengths, scores)
    use_kernel = backend == "triton" or (backend == "auto" and q.is_cuda and triton_available())
    if use_kernel:
        why = kernel_supports(q)
        if why is None:
            ops = importlib.import_module(f"{__package__}.ops")  # the kernel as a custom operator
            return ops.decode_attention(q, k_pool, v_pool, slots, lengths, float(scale), scores)
        if backend == "triton":
            raise ValueError(f"the Triton decode kernel cannot run: {why}")
    return reference_decode_attention(q, k_pool, v_pool, slots, lengths, scale, scores)
