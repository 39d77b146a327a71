"""Sequence-dimension eviction policies, one module each; importing this package registers them."""

from .base import EvictionPolicy
from .h2o import H2OPolicy
from .snapkv import SnapKVPolicy
from .streamingllm import StreamingLLMPolicy
from .window import WindowPolicy

__all__ = ["EvictionPolicy", "WindowPolicy", "StreamingLLMPolicy", "H2OPolicy", "SnapKVPolicy"]
