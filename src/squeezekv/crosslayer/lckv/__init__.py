"""Layer-Condensed KV cache (LCKV; Wu & Tu, ACL 2024, arXiv 2405.10637) as a transformers architecture.

Importing this package registers ``model_type="squeezekv_lckv"`` with ``AutoConfig`` and ``AutoModelForCausalLM``::

    from squeezekv.crosslayer.lckv import LCKVConfig, make_kv_sources
    config = LCKVConfig(kv_sources=make_kv_sources(12, "top", warmup=2), num_hidden_layers=12, ...)
    model = AutoModelForCausalLM.from_config(config)
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .budget import BudgetedLCKVCache
from .cache import LCKVCache, cache_nbytes, expected_nbytes, kv_bytes_per_token
from .configuration import LAYOUTS, LCKVConfig, check_kv_sources, make_kv_sources
from .convert import from_llama
from .modeling import LCKVForCausalLM, LCKVModel

AutoConfig.register(LCKVConfig.model_type, LCKVConfig, exist_ok=True)
AutoModelForCausalLM.register(LCKVConfig, LCKVForCausalLM, exist_ok=True)

__all__ = [
    "BudgetedLCKVCache",
    "LAYOUTS",
    "LCKVCache",
    "LCKVConfig",
    "LCKVForCausalLM",
    "LCKVModel",
    "cache_nbytes",
    "check_kv_sources",
    "expected_nbytes",
    "from_llama",
    "kv_bytes_per_token",
    "make_kv_sources",
]
