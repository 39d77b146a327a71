"""squeezekv's attention function, mask function and model hooks — the only places it touches a model.

* The attention function is registered in transformers' ``AttentionInterface`` under the name ``"squeezekv"``. It
  builds each layer's mask from that layer's held tokens (layers hold different tokens after eviction), feeds the
  eviction policy the queries/weights it scores with (H2O, SnapKV), computes attention with SDPA or eager math, and
  then lets the layer evict.
* The mask function registered under the same name in ``AttentionMaskInterface`` only passes the 2-D padding mask
  through (the model-wide 4-D mask would be sized for one layer).
* Hooks on the decoder layers measure SqueezeAttention's layer importance during the prefill.

No model class is patched: :func:`attach` switches the model to the ``"squeezekv"`` implementation through
``set_attn_implementation`` and registers hooks; :func:`detach` undoes both. The attention maths (masks, weights,
eager/SDPA attention) is in :mod:`squeezekv.attention_math`, which the layers use too.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention_math import causal, no_empty_rows, sdpa
from .cache import SqueezeCache, SqueezeLayer
from .models import arch_spec, decoder_layers

ATTN_NAME = "squeezekv"


def squeezekv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over one layer's held tokens. Shapes: query ``[B, Hq, q, D]``, key/value ``[B, Hkv, n, D]``;
    ``attention_mask`` is the 2-D padding mask ``[B, tokens seen]`` from :func:`squeezekv_mask` (or None).
    Returns ``([B, q, Hq, D], None)`` like transformers' own attention functions."""
    if softcap is not None:
        raise ValueError("attention logit soft-capping is not supported by squeezekv's attention function")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"squeezekv expects the 2-D padding mask, got a {attention_mask.dim()}-D attention mask: "
            "custom 4-D masks are not supported"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = kwargs.get("squeezekv_layer")
    q_len = query.shape[2]
    if not isinstance(layer, SqueezeLayer):
        # No squeezekv layer (no cache, a transformers cache, or an unmanaged sliding layer): keys are the last n
        # tokens of the sequence, contiguous.
        n = key.shape[2]
        allowed = None
        if attention_mask is not None or sliding_window:
            allowed = causal(q_len, n, key.device)[None, None]  # [1, 1, q, n]
            if sliding_window:
                rel = (torch.arange(n, device=key.device)[None, :]
                       - torch.arange(n - q_len, n, device=key.device)[:, None])
                allowed = allowed & (rel > -sliding_window)
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, None, None, -n:]
            allowed = no_empty_rows(allowed)
        dropout = dropout if module.training else 0.0
        out = sdpa(query, key, value, allowed, scaling, dropout)
        return out.transpose(1, 2).contiguous(), None

    layer.set_padding(attention_mask)
    query = layer.attention_query(query)  # identity unless the layer attends in a projected space
    allowed = layer.allowed(q_len, sliding_window)
    if allowed is not None:
        allowed = no_empty_rows(allowed)
    policy = layer.policy
    observe = layer.selects_tokens  # a layer that follows another layer's selection feeds no policy
    if observe and policy.wants_weights(layer, q_len):
        q_valid = None if attention_mask is None else attention_mask[:, -q_len:]  # [B, q]
        for start, end, weights in layer.weight_chunks(query, key, allowed, scaling):
            policy.observe_weights(layer, weights, None if q_valid is None else q_valid[:, start:end])
    out = layer.attend(query, key, value, allowed, scaling)
    b, hq, _, d = query.shape
    if observe:
        policy.observe_queries(layer, query.reshape(b, key.shape[1], hq // key.shape[1], q_len, d), allowed, scaling)
    layer.after_attention(q_len)
    return out.transpose(1, 2).contiguous(), None


def squeezekv_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask function for the ``"squeezekv"`` implementation: pass the 2-D padding mask through (None if no padding);
    each layer builds its own mask from the tokens it holds."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask.bool()
    if attention_mask.all():
        return None
    if q_length > 1 and bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError("right padding is not supported: pad on the left (tokenizer.padding_side = 'left')")
    return attention_mask


def register() -> None:
    """Register the attention and mask functions under ``"squeezekv"`` (idempotent)."""
    AttentionInterface.register(ATTN_NAME, squeezekv_attention)
    AttentionMaskInterface.register(ATTN_NAME, squeezekv_mask)


# model -> (original attention implementation, hook handles)
_ATTACHED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[str, list[Any]]]" = weakref.WeakKeyDictionary()


def _cache_of(kwargs: dict[str, Any]) -> SqueezeCache | None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if isinstance(cache, SqueezeCache) else None


def _importance_hooks(decoder_layer: torch.nn.Module, norm_name: str | None) -> list[Any]:
    layer_idx = decoder_layer.self_attn.layer_idx

    def before_layer(module, args, kwargs):
        cache = _cache_of(kwargs)
        if cache is None or not cache.collecting_importance or layer_idx not in cache.managed:
            return
        # [B, q, hidden], the residual stream; the first forward (the prompt, even of one token) is measured
        cache.pending_hidden[layer_idx] = args[0] if args else kwargs["hidden_states"]

    def after_attention(module, args, kwargs, output):
        cache = _cache_of(kwargs)
        if cache is None:
            return
        before = cache.pending_hidden.pop(layer_idx, None)
        if before is None:
            return
        attn_out = output[0] if isinstance(output, tuple) else output  # [B, q, hidden]
        if norm_name is not None:
            attn_out = getattr(decoder_layer, norm_name)(attn_out)
        after = before + attn_out
        cos = F.cosine_similarity(before.float(), after.float(), dim=-1)  # [B, q]
        pad = kwargs.get("attention_mask")
        if isinstance(pad, torch.Tensor) and pad.dim() == 2:
            weight = pad[:, -cos.shape[1]:].float()
            value = float((cos * weight).sum() / weight.sum().clamp_min(1.0))
        else:
            value = float(cos.mean())
        cache.record_importance(layer_idx, value, prompt_length=cache.layers[layer_idx].seen)

    return [
        decoder_layer.register_forward_pre_hook(before_layer, with_kwargs=True),
        decoder_layer.self_attn.register_forward_hook(after_attention, with_kwargs=True),
    ]


def attach(model: torch.nn.Module) -> torch.nn.Module:
    """Switch ``model`` to squeezekv's attention and install its hooks (idempotent). Returns the model.

    The model still computes exactly what it computed before with any cache: with no squeezekv cache the attention
    function falls back to a plain causal SDPA over the keys it is given."""
    spec = arch_spec(model.config)
    register()
    if model in _ATTACHED:
        return model
    original = getattr(model.config, "_attn_implementation", None) or "sdpa"
    handles: list[Any] = []
    for decoder_layer in decoder_layers(model):
        handles.extend(_importance_hooks(decoder_layer, spec.attn_out_norm))
    model.set_attn_implementation(ATTN_NAME)
    _ATTACHED[model] = (original, handles)
    return model


def original_attn_implementation(model: torch.nn.Module) -> str:
    """The attention implementation the model had before :func:`attach` (or its current one)."""
    if model in _ATTACHED:
        return _ATTACHED[model][0]
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


def detach(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`attach`: remove the hooks and restore the original attention implementation."""
    entry = _ATTACHED.pop(model, None)
    if entry is not None:
        original, handles = entry
        for h in handles:
            h.remove()
        model.set_attn_implementation(original)
    return model
