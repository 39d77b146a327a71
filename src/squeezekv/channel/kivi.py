"""KIVI: asymmetric 2-bit (or 4-bit) KV cache, keys quantised per channel, values per token.

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024, arXiv 2402.02750.
Round-to-nearest asymmetric quantisation with ``2**bits`` levels: ``code = round((x - zero) / scale)``,
``scale = (max - min) / (2**bits - 1)``, ``zero = min``; dequantised ``code * scale + zero``, so the error of an element
is at most ``scale / 2``.

* Keys, per channel: a group of ``group_size`` consecutive tokens shares one (scale, zero) per channel (key outliers
  are channel-wise, so grouping along tokens keeps them apart).
* Values, per token: each token's channels are split into groups of ``group_size`` channels with their own
  (scale, zero).
* The newest ``residual`` tokens (at least; up to ``residual + group_size - 1``) stay in full precision; when the
  residual reaches ``residual + group_size`` tokens, its oldest ``group_size`` tokens are quantised together (one key
  group). The paper's defaults: ``group_size`` = 32, ``residual`` = 128.
* Codes are packed ``8 / bits`` to a byte (:mod:`squeezekv.channel.packing`); scales and zeros are stored in the
  model's dtype. Bytes per quantised token and KV head: ``2 * D * bits / 8`` (codes) ``+ 2 * (D / group_size) *
  dtype`` (value scales/zeros) ``+ 2 * D * dtype / group_size`` (key scales/zeros of its group).

Differences from the paper, all stated in ``docs/channel.md``: the paper keeps keys and values in separate residuals
(keys: 0 to R-1 tokens, flushed R at a time; values: exactly R); here one residual of R to R+G-1 tokens serves both,
so a token is either quantised or full precision in K and V alike (this keeps eviction and block attention simple).
Keys are quantised as the model caches them, after rotary embedding.

Attention over the quantised tokens (see :mod:`squeezekv.channel.quantized`): the PyTorch reference path
dequantises one block at a time; decoding steps on a CUDA device use fused Triton kernels
(:mod:`squeezekv.channel.kivi_triton`, parameter ``kernel``) that read the packed codes once, unpack and
dequantise them in registers, never write dequantised keys/values to memory, and also attend to the full-precision
residual and write the normalised output (:meth:`KIVILayer.attend`); :meth:`KIVILayer._quantised_state` gives the
kernel's running state over the quantised part to callers that merge the rest themselves. Whether the kernel can run
is checked once per layer and (device, dtype, head dimension); its launch arguments are reused between flushes.

Composition with eviction (evict first, quantise the survivors; see :mod:`squeezekv.channel.quantized`): when a
policy evicts quantised tokens, each kept token keeps its key group through a per-token group id (int16, int32 for
contexts over 32k) into a table of per-group scales/zeros; groups with no token left are dropped. The group ids exist
only once an eviction has touched quantised tokens (before that the group of position ``p`` is ``p // group_size``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from ..registry import register_channel
from .base import ChannelMethod
from .kernels import FusedKernelChoice, KiviKernelConfig, check_kernel, kernel_config
from .packing import pack, unpack
from .quantized import QuantizedLayer


def quantize(x: torch.Tensor, bits: int, dim: int, store_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         torch.Tensor]:
    """Asymmetric round-to-nearest quantisation of ``x`` with one (scale, zero) per slice along ``dim``.

    Returns ``(codes uint8 like x, scale, zero)`` with ``scale``/``zero`` reduced over ``dim`` (kept as size 1) and
    stored in ``store_dtype``; the codes are computed with the *stored* scale and zero, so that
    ``|x - (code * scale + zero)| <= scale / 2`` holds for what is dequantised."""
    qmax = (1 << bits) - 1
    xf = x.float()
    lo = xf.amin(dim=dim, keepdim=True)
    hi = xf.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / qmax).to(store_dtype)
    zero = lo.to(store_dtype)
    s = scale.float()
    codes = torch.round((xf - zero.float()) / torch.where(s > 0, s, torch.ones_like(s))).clamp_(0, qmax)
    return codes.to(torch.uint8), scale, zero


class KIVILayer(FusedKernelChoice, QuantizedLayer):
    """Storage (``nq`` quantised positions, ``ng`` key groups, ``P = D * bits / 8``): ``kcode``/``vcode``
    ``[B, H, nq, P]`` uint8; ``vscale``/``vzero`` ``[B, H, nq, D / group_size]``; ``kscale``/``kzero``
    ``[B, H, ng, D]``; ``kgid`` ``[B, H, nq]`` int16/int32 or None (group of position p = p // group_size). A layer that
    stores values only (:attr:`SqueezeLayer.stores_keys` False) has ``vcode``/``vscale``/``vzero`` and no key fields."""

    token_fields = ("kcode", "vcode", "vscale", "vzero", "kgid")
    table_fields = ("kscale", "kzero")

    def __init__(self, cache: Any, layer_idx: int, method: "KIVI"):
        super().__init__(cache, layer_idx, residual=method.residual, flush_block=method.group_size)
        self.bits = method.bits
        self.group_size = method.group_size
        self.kernel = method.kernel
        self.kernel_config: KiviKernelConfig = kernel_config(KiviKernelConfig, method.kernel_config, "kivi")
        self._plan: dict[str, Any] = {}  # the kernel's launch arguments, reused between flushes (kivi_triton)

    def _init_storage(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        for dim, what in ((d, "key"), (dv, "value"))[0 if self.stores_keys else 1:]:
            if dim % self.group_size or (dim * self.bits) % 8:
                raise ValueError(
                    f"kivi group_size={self.group_size} does not fit the {what} head dimension {dim} of layer "
                    f"{self.layer_idx}: the head dimension must be a multiple of group_size (values are grouped by "
                    "channels) and its codes must fill whole bytes"
                )
        dt, dev = key_states.dtype, key_states.device
        u8 = torch.uint8
        self.vcode = torch.empty((b, h, 0, dv * self.bits // 8), dtype=u8, device=dev)
        self.vscale = torch.empty((b, h, 0, dv // self.group_size), dtype=dt, device=dev)
        self.vzero = torch.empty_like(self.vscale)
        self.kgid = None
        if self.stores_keys:  # a values-only layer has no key codes, scales or group ids
            self.kcode = torch.empty((b, h, 0, d * self.bits // 8), dtype=u8, device=dev)
            self.kscale = torch.empty((b, h, 0, d), dtype=dt, device=dev)
            self.kzero = torch.empty_like(self.kscale)

    def _gid_dtype(self) -> torch.dtype:
        return torch.int16 if self.cache.max_context < (1 << 15) else torch.int32

    def _gid(self, pos: slice | torch.Tensor) -> torch.Tensor:
        """Key group (int64) of quantised positions ``pos`` (slice or ``[B, H, m]`` indices) -> ``[B|1, H|1, m]``."""
        if self.kgid is not None:
            return (self.kgid[:, :, pos] if isinstance(pos, slice) else self.kgid.gather(2, pos)).long()
        if isinstance(pos, slice):
            return (torch.arange(pos.start, pos.stop, device=self.device) // self.group_size).view(1, 1, -1)
        return pos // self.group_size

    def _encode(self, keys: torch.Tensor | None, values: torch.Tensor, reserve: int) -> None:
        b, h, m, dv = values.shape
        g = self.group_size
        # values: per token over groups of g channels -> scale/zero [B, H, m, D/g, 1]
        vc, vs, vz = quantize(values.reshape(b, h, m, dv // g, g), self.bits, dim=4, store_dtype=self.dtype)
        self._append("vcode", pack(vc.reshape(b, h, m, dv), self.bits), reserve)
        self._append("vscale", vs.squeeze(-1), reserve)
        self._append("vzero", vz.squeeze(-1), reserve)
        if keys is None:
            return
        d = keys.shape[-1]
        ng_old = self.kscale.shape[2]
        # keys: per channel over groups of g tokens -> scale/zero [B, H, m/g, 1, D]
        kc, ks, kz = quantize(keys.reshape(b, h, m // g, g, d), self.bits, dim=3, store_dtype=self.dtype)
        self._append("kcode", pack(kc.reshape(b, h, m, d), self.bits), reserve)
        self._append("kscale", ks.squeeze(3), reserve // g)
        self._append("kzero", kz.squeeze(3), reserve // g)
        if self.kgid is not None:
            gid = ng_old + torch.arange(m, device=self.device) // g
            self._append("kgid", gid.to(self.kgid.dtype).expand(b, h, m), reserve)

    def _dequant(self, pos: slice | torch.Tensor, keys: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        def rows(t: torch.Tensor) -> torch.Tensor:
            if isinstance(pos, slice):
                return t[:, :, pos]
            return t.gather(2, pos[..., None].expand(-1, -1, -1, t.shape[-1]))

        dt, g = self.dtype, self.group_size
        vc = unpack(rows(self.vcode), self.bits).to(dt)  # [B, H, m, Dv]
        b, h, m, dv = vc.shape
        values = (vc.view(b, h, m, dv // g, g) * rows(self.vscale)[..., None] + rows(self.vzero)[..., None])
        values = values.view(b, h, m, dv)
        if not (keys and self.stores_keys):
            return None, values
        kc = unpack(rows(self.kcode), self.bits).to(dt)  # [B, H, m, D]
        d = kc.shape[-1]
        if isinstance(pos, slice) and self.kgid is None and pos.start % g == 0 and m % g == 0:
            # whole groups in storage order: broadcast each group's scale/zero over its g tokens (no gather)
            g0 = pos.start // g
            ks, kz = self.kscale[:, :, g0:g0 + m // g, None], self.kzero[:, :, g0:g0 + m // g, None]
            k = (kc.view(b, h, m // g, g, d) * ks + kz).view(b, h, m, d)
        else:
            gid = self._gid(pos).expand(b, h, m)[..., None].expand(-1, -1, -1, d)  # [B, H, m, D]
            k = kc * self.kscale.gather(2, gid) + self.kzero.gather(2, gid)
        return k, values

    method_name = "kivi"
    kernel_module_name = "kivi_triton"

    def _kernel_support(self, kt: Any, device: torch.device, dtype: torch.dtype, d: int) -> str | None:
        return kt.supports(device, d, self.values.shape[-1], self.bits, self.group_size, dtype)

    def _kernel_storage(self) -> tuple[torch.Tensor, ...]:
        """The packed storage the kernel reads: codes, scales/zeros and group ids (or None) of positions ``0..nq-1``
        (the fields themselves when they hold exactly ``nq`` positions, as after an append: no slicing)."""
        n = self.nq

        def used(t: torch.Tensor) -> torch.Tensor:
            return t if t.shape[2] == n else t[:, :, :n]

        return (used(self.kcode), used(self.vcode), self.kscale, self.kzero, used(self.vscale), used(self.vzero),
                None if self.kgid is None else used(self.kgid))

    def _quantised_state(self, qg: torch.Tensor, mask: torch.Tensor | None, scaling: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # the fused kernel for decoding steps (kernel "auto" only on CUDA: CPU behaviour never changes)
        if not self._use_kernel(qg, mask is None and qg.shape[3] == 1):
            return super()._quantised_state(qg, mask, scaling)
        state = self._run_kernel(lambda kt: kt.decode_state(
            qg[:, :, :, 0], *self._kernel_storage(), self.bits, self.group_size, scaling, config=self.kernel_config,
            plan=self._plan))
        if state is None:
            return super()._quantised_state(qg, mask, scaling)
        m, s, acc = state  # [B, H, G], [B, H, G], [B, H, G, Dv]
        return m[..., None], s[..., None], acc[:, :, :, None]

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None, scaling: float
    ) -> torch.Tensor:
        """A decoding step (one query token, no mask) with the kernel: the quantised part and the full-precision
        residual in two kernel launches (:func:`squeezekv.channel.kivi_triton.decode_attend`), output written in the
        query's dtype; otherwise :meth:`QuantizedLayer.attend` (the kernel's state via :meth:`_quantised_state`
        where it applies, then the residual in PyTorch)."""
        if self.nq == 0 or not self.stores_keys or not self._use_kernel(query, allowed is None and query.shape[2] == 1):
            return super().attend(query, key, value, allowed, scaling)
        b, hq, _, d = query.shape
        h = self.keys.shape[1]
        out = self._run_kernel(lambda kt: kt.decode_attend(
            query.reshape(b, h, hq // h, d), *self._kernel_storage(), self.keys, self.values, self.bits,
            self.group_size, scaling, config=self.kernel_config, plan=self._plan))  # [B, H, G, Dv]
        if out is None:
            return super().attend(query, key, value, allowed, scaling)
        return out.view(b, hq, 1, out.shape[-1])

    def _gather_quantised(self, idx: torch.Tensor) -> None:
        # idx: [B, H, s]
        for name in ("vcode", "vscale", "vzero"):
            t = getattr(self, name)
            setattr(self, name, t.gather(2, idx[..., None].expand(-1, -1, -1, t.shape[-1])))
        if not self.stores_keys:
            return
        gid = self._gid(idx)  # [B, H, s] int64, into the current group table
        self.kcode = self.kcode.gather(2, idx[..., None].expand(-1, -1, -1, self.kcode.shape[-1]))
        # drop the groups no kept token refers to, and renumber
        used = torch.zeros(self.kscale.shape[2], dtype=torch.bool, device=self.device)
        used[gid.reshape(-1)] = True
        remap = used.long().cumsum(0) - 1
        self.kscale = self.kscale[:, :, used]
        self.kzero = self.kzero[:, :, used]
        self.kgid = remap[gid].to(self._gid_dtype())


@register_channel("kivi")
@dataclass
class KIVI(ChannelMethod):
    """KIVI: keys per channel and values per token at ``bits`` bits; ``residual`` newest tokens in full precision.

    ``kernel`` picks how a decoding step attends over the quantised tokens: ``"auto"`` (default) uses the fused
    Triton kernel (:mod:`squeezekv.channel.kivi_triton`) when the query is on a CUDA device and triton is
    importable, else the PyTorch reference path (so CPU behaviour never changes); ``"torch"`` always uses the
    reference path; ``"triton"`` requires the kernel and raises ValueError when triton is missing (at cache
    creation) or the query's device or head dimensions do not suit it (at attention; on CPU only with
    ``TRITON_INTERPRET=1``). Under every setting, multi-token chunks and padded or masked rows (which the kernel
    does not cover) take the reference path. Should the kernel fail to compile or launch under ``"auto"``, a
    warning is issued and the reference path is used from then on. ``kernel_config``: the kernel's launch settings
    (:class:`squeezekv.channel.kernels.KiviKernelConfig`, or a dict of its fields; None: the defaults), kept as the
    dict of its fields; each layer holds the config object."""

    paper = "Liu et al. 2024, arXiv 2402.02750"
    layer_class = KIVILayer
    summary = "2/4-bit KV, keys per channel and values per token, full-precision recent tokens"
    bits: int = 2
    group_size: int = 32
    residual: int = 128
    kernel: str = "auto"
    kernel_config: KiviKernelConfig | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        # kept as a plain dict of the config's fields (validated): the method's parameters stay JSON/snapshot data
        self.kernel_config = asdict(kernel_config(KiviKernelConfig, self.kernel_config, "kivi"))
        if isinstance(self.bits, bool) or self.bits not in (2, 4):
            raise ValueError(f"kivi bits={self.bits!r} is out of range: choose 2 or 4")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"kivi group_size={self.group_size!r} is out of range: must be an integer >= 1")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"kivi residual={self.residual!r} is out of range: must be an integer >= 0")
        check_kernel("kivi", self.kernel, "kivi_triton")

    def make_layer(self, cache: Any, layer_idx: int, role: type | None = None, **role_kwargs: Any) -> KIVILayer:
        check_kernel("kivi", self.kernel, "kivi_triton", at_creation=True)
        return super().make_layer(cache, layer_idx, role, **role_kwargs)

    def bytes_per_token(self, head_dim: int, kv_heads: int, dtype_bytes: int) -> float:
        """KV bytes of one quantised token in one layer (all KV heads), key scales amortised over their group."""
        d, g = head_dim, self.group_size
        return kv_heads * (2 * d * self.bits / 8 + 2 * (d / g) * dtype_bytes + 2 * d * dtype_bytes / g)
