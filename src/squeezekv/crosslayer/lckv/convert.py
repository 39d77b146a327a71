"""Initialise an LCKV model from a pretrained Llama-architecture model (Wu & Tu, ACL 2024, arXiv 2405.10637: the
reference code's ``convert_pretrained.py`` option, beside training from scratch).

Every parameter keeps its name; the ``k_proj``/``v_proj`` of layers that read another layer's KV are dropped (they
would never be used).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .configuration import LCKVConfig
from .modeling import LCKVForCausalLM


def lckv_config_from(llama_config: Any, kv_sources: Sequence[int], forward_passes: int = 7,
                     backward_passes: int = 2) -> LCKVConfig:
    """An :class:`LCKVConfig` with every field of ``llama_config`` (a ``LlamaConfig``) plus the LCKV fields."""
    fields = llama_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "quantization_config", "kv_sources",
                "forward_passes", "backward_passes", "kv_sharing_modes"):
        fields.pop(key, None)
    return LCKVConfig(kv_sources=list(kv_sources), forward_passes=forward_passes, backward_passes=backward_passes,
                      **fields)


def from_llama(llama: Any, kv_sources: Sequence[int], forward_passes: int = 7,
               backward_passes: int = 2) -> LCKVForCausalLM:
    """An LCKV model with ``llama``'s weights (a ``LlamaForCausalLM``), same dtype and device."""
    if getattr(llama.config, "model_type", None) != "llama":
        raise ValueError(f"from_llama needs a Llama-architecture model, got model_type {llama.config.model_type!r}")
    config = lckv_config_from(llama.config, kv_sources, forward_passes, backward_passes)
    param = next(llama.parameters())
    model = LCKVForCausalLM(config).to(dtype=param.dtype, device=param.device)
    source = llama.state_dict()
    target = model.state_dict()
    missing = sorted(set(target) - set(source))
    if missing:
        raise ValueError(f"the Llama checkpoint lacks {missing[:5]}")
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(source[name])
    return model.eval() if not llama.training else model
