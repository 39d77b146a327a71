"""Bit packing of low-bit codes: ``8 // bits`` codes of ``bits`` bits (1, 2, 4 or 8) share one ``uint8`` along the
last dimension. The round trip is exact; code ``i`` of a byte sits at bit offset ``bits * i`` (little-endian within
the byte)."""

from __future__ import annotations

import torch

#: bit widths that divide a byte
WIDTHS = (1, 2, 4, 8)


def check_width(bits: int, who: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in WIDTHS:
        raise ValueError(f"{who}={bits!r} is out of range: codes are packed into bytes, choose one of {WIDTHS}")
    return bits


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take (``n`` must fill whole bytes)."""
    per = 8 // check_width(bits)
    if n % per:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes: the count must be a multiple of {per}")
    return n // per


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)  # [8 // bits]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` ``[..., n]`` (integers in ``[0, 2**bits)``, any integer dtype) -> ``[..., n * bits / 8]`` uint8."""
    n = codes.shape[-1]
    packed_size(n, bits)
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], n // per, per)  # [..., n / per, per]
    return (c << _shifts(bits, codes.device)).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: sum == or


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., m]`` uint8 -> ``[..., m * 8 / bits]`` uint8 codes."""
    check_width(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    c = (packed[..., None] >> _shifts(bits, packed.device)) & mask  # [..., m, 8 / bits]
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))
