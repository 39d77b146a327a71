"""Sequence-dimension eviction policies, one module each; importing this package registers them (in this order)."""

from .base import EvictionPolicy

from .window import WindowPolicy  # isort: skip
from .streamingllm import StreamingLLMPolicy  # isort: skip
from .h2o import H2OPolicy  # isort: skip
from .snapkv import SnapKVPolicy  # isort: skip
from .none import NoEvictionPolicy  # isort: skip

__all__ = ["EvictionPolicy", "WindowPolicy", "StreamingLLMPolicy", "H2OPolicy", "SnapKVPolicy", "NoEvictionPolicy"]
