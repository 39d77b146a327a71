"""Channel-dimension methods (fewer channels or fewer bits per cached token), one module each; importing this package
registers them (in this order)."""

from .base import ChannelMethod
from .kernels import CoupledKernelConfig, KiviKernelConfig

from . import coupled  # isort: skip
from . import kivi  # isort: skip
from . import eigen  # isort: skip  (Eigen Attention, arXiv 2408.05646)

__all__ = ["ChannelMethod", "CoupledKernelConfig", "KiviKernelConfig", "coupled", "eigen", "kivi"]
