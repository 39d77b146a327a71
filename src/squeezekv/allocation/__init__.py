"""Layer-dimension budget allocation, one module each; importing this package registers them (in this order)."""

from .base import Allocator
from .kmeans1d import kmeans_1d

from .uniform import UniformAllocation  # isort: skip
from .pyramid import PyramidAllocation  # isort: skip
from .squeeze import SqueezeAllocation  # isort: skip

__all__ = ["Allocator", "UniformAllocation", "PyramidAllocation", "SqueezeAllocation", "kmeans_1d"]
