"""Layer-dimension budget allocation, one module each; importing this package registers them."""

from .base import Allocator
from .kmeans1d import kmeans_1d
from .pyramid import PyramidAllocation
from .squeeze import SqueezeAllocation
from .uniform import UniformAllocation

__all__ = ["Allocator", "UniformAllocation", "PyramidAllocation", "SqueezeAllocation", "kmeans_1d"]
