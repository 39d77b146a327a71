"""The LCKV model (Wu & Tu, "Layer-Condensed KV Cache for Efficient Inference of Large Language Models", ACL 2024,
arXiv 2405.10637) for transformers 5.x: Llama blocks, each layer attending to the KV of ``config.kv_sources[l]``.

Attention rule (paper section 2.1). For layer ``l`` with source ``s = kv_sources[l]``:

* ``s <= l``: the source KV of this token is known when layer ``l`` runs: ordinary causal attention (token ``i``
  sees source KV of tokens ``<= i``). ``s == l`` is a standard layer.
* ``s > l``: the source is computed later in the stack, so token ``i`` sees source KV of tokens ``< i`` only (the
  diagonal is masked). Token 0 has nothing to attend to: its attention output is the zero vector (the paper's and
  the reference code's zero key/value placeholder for the first token; attending only to a zero value gives 0).

Computation over a block of ``n`` new tokens (training, prompt encoding; paper section 2.2): ``m + b`` iterations of
the whole stack (``config.forward_passes`` = m without gradient, ``config.backward_passes`` = b with gradient; the
loss uses the last). Iteration ``t`` reads the source KV of layers above from iteration ``t - 1`` (zeros before the
first), so after ``t`` iterations the first ``t`` tokens are exact; with ``m + b >= n`` the result equals token-by-token
computation. Blocks of ``n <= m + b`` tokens use exactly ``n`` iterations. Only the last iteration's KV enters the
cache. Decoding one token needs one iteration (the sources of earlier tokens are in the cache).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DummyLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    rotate_half,
)

from .cache import LCKVCache
from .configuration import LCKVConfig

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [B, Hkv, n, D] (keys rotated)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, n, D]; cos/sin: [B, n, D]
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class LCKVAttention(nn.Module):
    """Llama attention whose keys/values come from layer ``config.kv_sources[layer_idx]``. Only KV-producing layers
    own ``k_proj``/``v_proj`` (the other layers would never use them)."""

    def __init__(self, config: LCKVConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.source = config.kv_sources[layer_idx]
        self.computes_kv = self.source == layer_idx
        self.attends_up = self.source > layer_idx  # diagonal masked
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        if self.computes_kv:
            self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def compute_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> KV:
        """Keys (rotated) and values of normalised hidden states ``x`` [B, n, hidden] -> two [B, Hkv, n, D]."""
        if not self.computes_kv:
            raise RuntimeError(f"layer {self.layer_idx} reads KV of layer {self.source}; it computes none")
        shape = (*x.shape[:-1], -1, self.head_dim)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        return _rotate(k, cos, sin), v

    def attend(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        allowed: torch.Tensor | str,
    ) -> torch.Tensor:
        """Queries from ``x`` [B, n, hidden] attend to ``keys``/``values`` [B, Hkv, k, D] where ``allowed``
        [B or 1, 1, n, k] (bool) is True, or by rule: ``"all"`` (one query, every key), ``"causal"`` (k = n, key
        j <= query i), ``"strict"`` (k = n - 1, key j < query i). Rows with no allowed key output zeros.
        Returns [B, n, hidden]. The rules use SDPA's ``is_causal`` (flash kernels) instead of a mask."""
        b, n, _ = x.shape
        q = _rotate(self.q_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2), cos, sin)  # [B, H, n, D]
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # under autocast the first iteration's zeros are fp32
        groups = self.num_heads // self.num_kv_heads
        dropout = self.attention_dropout if self.training else 0.0
        if keys.shape[2] == 0:
            out = q.new_zeros(q.shape)
        elif isinstance(allowed, str) and allowed == "all":
            if n != 1:
                raise ValueError(f"rule 'all' is only for one query token, got {n}")
            # one decode query per row: pack the query heads of each KV group as that group's queries, so K/V are
            # never expanded. q: [B, H, 1, D] -> [B, Hkv, G, D]
            qg = q.reshape(b, self.num_kv_heads, groups, self.head_dim)
            out = F.scaled_dot_product_attention(qg, keys, values, dropout_p=dropout, scale=self.scaling)
            out = out.reshape(b, self.num_heads, 1, self.head_dim)
        else:
            if groups > 1:  # [B, Hkv, k, D] -> [B, H, k, D]: fused kernels take no grouped K/V with masks
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            if isinstance(allowed, str):
                if allowed not in ("causal", "strict"):
                    raise ValueError(f"unknown attention rule {allowed!r}")
                if allowed == "causal":
                    out = F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout, scale=self.scaling,
                                                         is_causal=True)
                else:  # query i sees keys < i: query 0 sees none (output 0); queries 1.. are causal over the keys
                    rest = F.scaled_dot_product_attention(q[:, :, 1:], keys, values, dropout_p=dropout,
                                                          scale=self.scaling, is_causal=True)
                    out = torch.cat([q.new_zeros(q[:, :, :1].shape), rest], dim=2)
            else:
                empty = ~allowed.any(dim=-1, keepdim=True)  # [B|1, 1, n, 1]
                safe = allowed.clone()
                safe[..., :1] |= empty  # let empty rows see key 0 (output zeroed below): no NaN, no leak
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=safe, dropout_p=dropout,
                                                     scale=self.scaling)
                out = out.masked_fill(empty, 0.0)
        out = out.transpose(1, 2).reshape(b, n, -1)  # [B, n, H*D]
        return self.o_proj(out)


class LCKVDecoderLayer(nn.Module):
    """Pre-norm Llama block (same parameter names as ``LlamaDecoderLayer``)."""

    def __init__(self, config: LCKVConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LCKVAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LCKVPreTrainedModel(PreTrainedModel):
    config_class = LCKVConfig
    config: LCKVConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LCKVDecoderLayer"]
    _supports_sdpa = True

    # transformers' default _init_weights: normal(0, initializer_range) linears/embeddings, unit RMSNorm weights, and
    # the rotary embedding's non-persistent inv_freq buffer on loading


def _past_length(cache: Cache | None) -> int:
    """Tokens seen before this block (an :class:`LCKVCache` says so itself; a budgeted one counts evicted tokens)."""
    if cache is None:
        return 0
    if isinstance(cache, LCKVCache):
        return cache.get_seq_length()
    for layer in cache.layers:
        if not isinstance(layer, DummyLayer):
            return layer.get_seq_length()
    return 0


def _cached(cache: Cache | None, layer_idx: int) -> KV | None:
    if cache is None or layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    if isinstance(layer, DummyLayer) or layer.get_seq_length() == 0:
        return None
    return layer.keys, layer.values


class LCKVModel(LCKVPreTrainedModel):
    """The decoder stack with iterative (parallel) computation over a block of tokens; see the module docstring."""

    def __init__(self, config: LCKVConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([LCKVDecoderLayer(config, l) for l in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def iteration_plan(self, n: int) -> tuple[int, int]:
        """``(without_grad, with_grad)`` iterations for a block of ``n`` new tokens (see the module docstring)."""
        cfg = self.config
        if not cfg.is_recurrent or n <= 1:
            return 0, 1
        total = min(cfg.forward_passes + cfg.backward_passes, n)
        grad = min(cfg.backward_passes, total)
        return total - grad, grad

    def _masks(
        self, n: int, past: int, pad: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor | str, torch.Tensor | str]:
        """What the layers at or above their source may see: [B|1, 1, n, past+n] (key j <= query position), and the
        layers below it: [B|1, 1, n, past+n-1] (key j < query position; the block's last token's source KV is never
        visible, so it is left out). Without padding, rules replace the masks: ``"all"`` for one token,
        ``"causal"``/``"strict"`` for a block with nothing cached (see :meth:`LCKVAttention.attend`)."""
        if pad is None and n == 1:
            return "all", "all"
        if pad is None and past == 0:
            return "causal", "strict"
        q = torch.arange(past, past + n, device=device)[:, None]
        k = torch.arange(past + n, device=device)[None, :]
        causal, strict = (k <= q)[None, None], (k < q)[None, None, :, : past + n - 1]
        if pad is not None:
            keep = pad.bool()[:, None, None, :]  # [B, 1, 1, past+n]
            causal, strict = causal & keep, strict & keep[..., : past + n - 1]
        return causal, strict

    def _iterate(
        self,
        h0: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Cache | None,
        estimate: dict[int, KV],
        causal: torch.Tensor | str,
        strict: torch.Tensor | str,
    ) -> tuple[torch.Tensor, dict[int, KV]]:
        """One pass of the whole stack over the block. ``estimate``: source layer -> KV of the block's tokens from the
        previous iteration (read by layers below their source). Returns the last hidden states [B, n, hidden] and
        this iteration's KV of every KV-producing layer."""
        fresh: dict[int, KV] = {}
        h = h0
        for l, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            if attn.computes_kv:
                fresh[l] = attn.compute_kv(x, cos, sin)
            s = attn.source
            if s <= l:
                k_new, v_new = fresh[s]
            else:  # source above: previous iteration's estimate, without the last token (visible to nobody)
                k_new, v_new = (t[:, :, : t.shape[2] - 1] for t in estimate[s])
            past = _cached(cache, s)
            if past is None:
                keys, values = k_new, v_new  # [B, Hkv, n or n-1, D]
            else:  # [B, Hkv, past + (n or n-1), D]
                keys, values = torch.cat([past[0], k_new], 2), torch.cat([past[1], v_new], 2)
            h = h + attn.attend(x, cos, sin, keys, values, strict if attn.attends_up else causal)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, fresh

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """``input_ids`` [B, n] (or ``inputs_embeds`` [B, n, hidden]); ``attention_mask`` [B, past+n] (1 = real
        token) or None; ``cache``/``past_key_values``: a cache holding earlier tokens (built when ``use_cache`` and
        none is given). Returns the normalised last hidden states [B, n, hidden] and the cache."""
        if cache is None:
            cache = past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        h0 = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, n, hidden]
        b, n, _ = h0.shape
        if use_cache is None:  # a cache handed in is always filled
            use_cache = cache is not None or self.config.use_cache
        if use_cache and cache is None:
            cache = LCKVCache(self.config)
        past = _past_length(cache)
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=h0.device)[None].expand(b, n)
        cos, sin = self.rotary_emb(h0, position_ids)  # [B, n, D] each
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D [batch, past+new], got shape {tuple(attention_mask.shape)}")
        if attention_mask is not None and attention_mask.shape[-1] != past + n:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected {past + n}")
        pad = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        if getattr(cache, "evicted", False) and not (n == 1 and pad is None):
            raise ValueError(f"the cache evicted tokens: feed one token at a time without padding, got a block of "
                             f"{n} tokens{' with padding' if pad is not None else ''}")
        causal, strict = self._masks(n, past, pad, h0.device)
        # estimates of the upward sources' KV for this block: zeros before the first iteration
        hkv, d = self.config.num_key_value_heads, self.layers[0].self_attn.head_dim
        zeros = h0.new_zeros((b, hkv, n, d))
        estimate: dict[int, KV] = {s: (zeros, zeros) for s in self.config.kv_layers}
        no_grad_iters, grad_iters = self.iteration_plan(n)
        with torch.no_grad():
            for _ in range(no_grad_iters):
                _, estimate = self._iterate(h0, cos, sin, cache, estimate, causal, strict)
        h = h0
        for _ in range(grad_iters):
            h, estimate = self._iterate(h0, cos, sin, cache, estimate, causal, strict)
        if use_cache and cache is not None:
            for s, (k, v) in estimate.items():
                cache.update(k, v, s)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), cache=cache if use_cache else None)


class LCKVForCausalLM(LCKVPreTrainedModel, GenerationMixin):
    """LCKV language model (``AutoModelForCausalLM`` for ``model_type="squeezekv_lckv"``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LCKVConfig):
        super().__init__(config)
        self.model = LCKVModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def make_cache(self) -> LCKVCache:
        """A fresh condensed cache (KV tensors only for ``config.kv_layers``)."""
        return LCKVCache(self.config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits [B, n, vocab] (the last ``logits_to_keep`` positions when > 0); ``labels`` [B, n] give the usual
        shifted next-token cross-entropy (``-100`` ignored)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)
