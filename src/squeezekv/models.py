"""The architectures squeezekv supports, and what it needs to know about each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArchSpec:
    """``attn_out_norm``: name of the decoder-layer norm applied to the attention output before the residual add
    (Gemma's sandwich norm), needed to measure SqueezeAttention's importance on the true post-attention state."""

    attn_out_norm: str | None = None


SUPPORTED: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    "mistral": ArchSpec(),
    "qwen2": ArchSpec(),
    "qwen3": ArchSpec(),
    "gemma3_text": ArchSpec(attn_out_norm="post_attention_layernorm"),
    "phi3": ArchSpec(),
}


def arch_spec(config: Any) -> ArchSpec:
    """Spec of the model's architecture; a clear error naming the supported ones otherwise."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None)
    outer = getattr(config, "model_type", None)
    if text_config is not config and outer != model_type:
        # a multimodal wrapper (e.g. Gemma3ForConditionalGeneration): its decoder is not at model.model.layers
        raise ValueError(
            f"model type {outer!r} is a multimodal model around a {model_type!r} text model, which squeezekv does not "
            f"support as a whole: load the text model on its own (e.g. Gemma3ForCausalLM or AutoModelForCausalLM "
            f"for gemma3); supported model types: {', '.join(SUPPORTED)}"
        )
    if model_type not in SUPPORTED:
        raise ValueError(
            f"model type {model_type!r} is not supported by squeezekv; supported: {', '.join(SUPPORTED)}"
        )
    return SUPPORTED[model_type]


def decoder_layers(model: Any) -> Any:
    """The model's list of decoder layers (``model.model.layers`` for every supported architecture)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at model.model.layers")
    return layers
