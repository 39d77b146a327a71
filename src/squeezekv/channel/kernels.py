"""How a quantised layer chooses between its fused Triton decoding kernel and the PyTorch reference path (KIVI:
:mod:`squeezekv.channel.kivi_triton`, CQ: :mod:`squeezekv.channel.coupled_triton`). No triton import here: the kernel
modules are imported on first use, and only when triton is importable.

A method's ``kernel`` parameter (one of :data:`KERNELS`): ``"auto"`` runs the kernel for decoding steps when the
query is on a CUDA device (so CPU behaviour never changes) and falls back to the reference path for good, with one
warning, should the kernel fail to compile or launch; ``"torch"`` never runs it; ``"triton"`` requires it and raises
``ValueError`` when the device or layout does not suit it (calls that are only not decoding steps — a prompt chunk,
a padded batch — take the reference path under every setting).
"""

from __future__ import annotations

import importlib
import warnings
from abc import abstractmethod
from typing import Any, Callable

import torch

#: values of a channel method's ``kernel`` parameter
KERNELS = ("auto", "torch", "triton")
#: why a method's kernel failed once, by method name (kernel "auto" then stops trying for good)
FAILED: dict[str, str] = {}
NO_TRITON = "triton is not importable (pip install 'squeezekv[gpu]')"


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
