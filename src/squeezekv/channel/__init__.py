"""Channel-dimension methods (fewer channels or fewer bits per cached token), one module each; importing this package
registers them."""

from . import coupled, eigen, kivi  # registers "coupled", "eigen" (Eigen Attention, arXiv 2408.05646) and "kivi"
from .base import ChannelMethod
from .kernels import CoupledKernelConfig, KiviKernelConfig

__all__ = ["ChannelMethod", "CoupledKernelConfig", "KiviKernelConfig", "coupled", "eigen", "kivi"]
