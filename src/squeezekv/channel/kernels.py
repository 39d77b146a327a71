"""How a quantised layer chooses between its fused Triton decoding kernel and the PyTorch reference path (KIVI:
:mod:`squeezekv.channel.kivi_triton`, CQ: :mod:`squeezekv.channel.coupled_triton`). No triton import here: the kernel
modules are imported on first use, and only when triton is importable.

A method's ``kernel`` parameter (one of :data:`KERNELS`): ``"auto"`` runs the kernel for decoding steps when the
query is on a CUDA device (so CPU behaviour never changes) and falls back to the reference path for good, with one
warning, should the kernel fail to compile or launch; ``"torch"`` never runs it; ``"triton"`` requires it and raises
``ValueError`` when the device or layout does not suit it (calls that are only not decoding steps — a prompt chunk,
a padded batch — take the reference path under every setting).

The kernels' launch settings (tokens per block, warps, split targets, ...) are frozen config objects,
:class:`KiviKernelConfig` and :class:`CoupledKernelConfig`, passed explicitly (a method's ``kernel_config``
parameter, or the ``config`` argument of the kernel functions); the defaults are the instances built without
arguments. They live here so that a method can take one without importing triton.
"""

from __future__ import annotations

import importlib
import warnings
from abc import abstractmethod
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Mapping

import torch

#: values of a channel method's ``kernel`` parameter
KERNELS = ("auto", "torch", "triton")
#: why a method's kernel failed once, by method name (kernel "auto" then stops trying for good)
FAILED: dict[str, str] = {}
NO_TRITON = "triton is not importable (pip install 'squeezekv[gpu]')"
#: split-kernel variants of the KIVI kernel (see :mod:`squeezekv.channel.kivi_triton`), besides "auto"
KIVI_VARIANTS = ("interleaved", "planes", "planes_fma")
#: warps per program Triton accepts
WARPS = (1, 2, 4, 8, 16, 32)


def _pow2(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value & (value - 1):
        raise ValueError(f"{name}={value!r} is out of range: must be a power of two >= {low}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is out of range: must be an integer >= 1")


def _warps(name: str, value: Any) -> None:
    if isinstance(value, bool) or value not in WARPS:
        raise ValueError(f"{name}={value!r} is out of range: choose one of {WARPS}")


@dataclass(frozen=True)
class KiviKernelConfig:
    """Launch settings of the fused KIVI decoding kernels (:mod:`squeezekv.channel.kivi_triton`; not tuned on a GPU
    beyond the measurements in docs/channel.md).

    ``variant``: the split kernel, one of :data:`KIVI_VARIANTS` or ``"auto"`` (``"planes"`` where it applies, else
    ``"interleaved"``; see ``kivi_triton.choose_variant``); ``block_n``: tokens per block of a split program's loop,
    a power of two >= 16 (None: :attr:`BLOCK_N_INTERLEAVED` for the interleaved variant, :attr:`BLOCK_N_PLANES` for
    the planes variants); ``num_warps``: warps per split program; ``programs_per_sm``: programs to aim for per
    streaming multiprocessor when choosing the number of splits; ``block_r``: residual tokens per step of the
    finishing kernel (a power of two)."""

    BLOCK_N_INTERLEAVED: ClassVar[int] = 64
    BLOCK_N_PLANES: ClassVar[int] = 32

    variant: str = "auto"
    block_n: int | None = None
    num_warps: int = 4
    programs_per_sm: int = 4
    block_r: int = 16

    def __post_init__(self) -> None:
        if self.variant not in KIVI_VARIANTS + ("auto",):
            raise ValueError(f"variant={self.variant!r} is out of range: choose one of {KIVI_VARIANTS + ('auto',)}")
        if self.block_n is not None:
            _pow2("block_n", self.block_n, 16)
        _warps("num_warps", self.num_warps)
        _positive("programs_per_sm", self.programs_per_sm)
        _pow2("block_r", self.block_r, 1)

    def block_n_for(self, variant: str) -> int:
        """Tokens per block for the split kernel ``variant`` actually run (``block_n``, or its default)."""
        if self.block_n is not None:
            return self.block_n
        return self.BLOCK_N_INTERLEAVED if variant == "interleaved" else self.BLOCK_N_PLANES


@dataclass(frozen=True)
class CoupledKernelConfig:
    """Launch settings of the fused Coupled Quantization decoding kernel (:mod:`squeezekv.channel.coupled_triton`).

    ``block_n``: tokens per block of a program's loop (a power of two >= 16); ``num_warps``: warps per program;
    ``programs_per_sm``: programs to aim for per streaming multiprocessor when choosing the number of splits;
    ``vector``: gather a centroid's channels as one contiguous load (False: one load per channel; same values);
    ``num_stages``: software-pipelining stages of the token loop (None: ``num_stages_large`` for at least
    ``large_rows`` (row, KV head) pairs, else Triton's default). Measured on an H100 (8B shape, 4k tokens,
    benchmarks/results/channel/gpu/h100_cq_kernel_sweep.json): 1 stage took 0.58 / 0.47 ms vs 1.10 / 0.62 ms with
    Triton's default at batch 64 (2 / 1 bits), but 0.16 / 0.12 vs 0.09 / 0.10 ms at batch 1: pipelined stages keep
    gathered centroids in shared memory, which the L1 caching the codebooks gives up once many heads run at once."""

    block_n: int = 32
    num_warps: int = 4
    programs_per_sm: int = 4
    vector: bool = True
    num_stages: int | None = None
    num_stages_large: int = 1
    large_rows: int = 128

    def __post_init__(self) -> None:
        _pow2("block_n", self.block_n, 16)
        _warps("num_warps", self.num_warps)
        _positive("programs_per_sm", self.programs_per_sm)
        if not isinstance(self.vector, bool):
            raise TypeError(f"vector={self.vector!r} must be a bool")
        if self.num_stages is not None:
            _positive("num_stages", self.num_stages)
        _positive("num_stages_large", self.num_stages_large)
        _positive("large_rows", self.large_rows)

    def stages_for(self, rows: int) -> int | None:
        """Pipelining stages for ``rows`` (row, KV head) pairs (None: Triton's default)."""
        if self.num_stages is None and rows >= self.large_rows:
            return self.num_stages_large
        return self.num_stages


def kernel_config(cls: type, value: Any, method: str) -> Any:
    """A method's ``kernel_config`` parameter as a ``cls`` instance: one already, or a mapping of its fields (the
    form a JSON suite or a :class:`squeezekv.spec.CacheSpec` carries); None gives the default."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{method} kernel_config keys {unknown} are unknown: choose from {sorted(known)}")
        try:
            return cls(**value)
        except ValueError as e:
            raise ValueError(f"{method} kernel_config: {e}") from None
    raise TypeError(f"{method} kernel_config={value!r} must be a {cls.__name__} or a dict of its fields")


def auto_uses_kernel(device: torch.device) -> bool:
    """Whether kernel "auto" tries the fused kernel on ``device`` (CUDA only: CPU behaviour never changes)."""
    return device.type == "cuda"


def kernel_module(name: str) -> Any:
    """``squeezekv.channel.<name>``, or None when triton is not importable (imported on first use)."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


def check_kernel(method: str, kernel: Any, module: str, at_creation: bool = False) -> None:
    """Validate a method's ``kernel`` parameter; with ``at_creation``, kernel "triton" also needs triton."""
    if kernel not in KERNELS:
        raise ValueError(f"{method} kernel={kernel!r} is out of range: choose one of {KERNELS}")
    if at_creation and kernel == "triton" and kernel_module(module) is None:
        raise ValueError(f"{method} kernel='triton' needs the triton package (pip install 'squeezekv[gpu]'); "
                         "use kernel='auto' or 'torch'")


class FusedKernelChoice:
    """Mixed into a :class:`squeezekv.channel.quantized.QuantizedLayer` subclass that has a fused decoding kernel.

    The subclass sets :attr:`method_name`, :attr:`kernel_module_name`, ``self.kernel`` (from its method) and
    implements :meth:`_kernel_support`; :meth:`_use_kernel` and :meth:`_run_kernel` decide and run."""

    method_name: str = ""
    kernel_module_name: str = ""
    kernel: str = "auto"
    layer_idx: int  # set by the layer class it is mixed into

    @abstractmethod
    def _kernel_support(self, kt: Any, device: torch.device, dtype: torch.dtype, d: int) -> str | None:
        """Why the kernel module ``kt`` cannot run for queries of this device, dtype and head dimension (None: it
        can)."""

    def _device_blocker(self, device: torch.device, dtype: torch.dtype, d: int) -> str | None:
        """:meth:`_kernel_support`, or why triton is missing; cached per layer and (device, dtype, head dim)."""
        blockers = self.__dict__.setdefault("_blockers", {})
        key = (device, dtype, d)
        if key not in blockers:
            kt = kernel_module(self.kernel_module_name)
            blockers[key] = NO_TRITON if kt is None else self._kernel_support(kt, device, dtype, d)
        return blockers[key]

    def _use_kernel(self, q: torch.Tensor, decoding: bool) -> bool:
        """Whether this call of queries ``q`` (``[.., D]``) runs the fused kernel; raises for kernel "triton" when it
        cannot run on this device/layout (not for a call that is only not a decoding step)."""
        if self.kernel == "torch" or (self.kernel == "auto" and (not auto_uses_kernel(q.device)
                                                                 or self.method_name in FAILED)):
            return False
        why = self._device_blocker(q.device, q.dtype, q.shape[-1])
        if why is not None:
            if self.kernel == "triton":
                raise ValueError(f"{self.method_name} kernel='triton' cannot run on layer {self.layer_idx}: {why}; "
                                 "use kernel='auto' or 'torch'")
            return False
        return decoding

    def _run_kernel(self, call: Callable[[Any], Any]) -> Any:
        """``call(kernel module)``, or None when it failed under kernel "auto" (then the reference path for good)."""
        try:
            return call(kernel_module(self.kernel_module_name))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # e.g. the kernel does not compile for this GPU: "auto" falls back, for good
            if self.kernel == "triton":
                raise
            FAILED[self.method_name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"{self.method_name}: the fused Triton kernel failed ({FAILED[self.method_name]}); using "
                          "the PyTorch reference path from now on", RuntimeWarning, stacklevel=3)
            return None
