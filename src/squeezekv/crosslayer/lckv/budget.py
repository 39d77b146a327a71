"""LCKV's condensed cache budgeted along the sequence by squeezekv's eviction policies (composition of LCKV, Wu & Tu,
ACL 2024, arXiv 2405.10637, with the registry's position-based policies: ``window`` and ``streamingllm``, Xiao et al.
2023, arXiv 2309.17453).

Each KV-producing layer keeps at most ``budget`` tokens: after the prompt and after every decoded token the policy
picks which cached positions stay (:meth:`squeezekv.policies.base.EvictionPolicy.select`) and the kept keys/values are
gathered into new, smaller tensors. Keys are cached already rotated, so kept tokens keep their true positions, and
``get_seq_length()`` reports tokens *seen* so new tokens get theirs. Policies that need attention scores (``h2o``,
``snapkv``) are rejected: LCKV's attention does not feed them. After an eviction only one-token steps are accepted
(a multi-token block would need masks over the scattered kept positions).
"""

from __future__ import annotations

from typing import Any

import torch

from ...registry import make_policy
from .cache import LCKVCache
from .configuration import LCKVConfig


class _PolicyView:
    """What a policy reads from a layer: logical index of each held token ``token_idx`` [B, Hkv, n] (int64),
    ``valid`` (None: no padding) and ``physical_length``."""

    def __init__(self, token_idx: torch.Tensor):
        self.token_idx = token_idx
        self.valid = None
        self.physical_length = token_idx.shape[-1]


class BudgetedLCKVCache(LCKVCache):
    """An :class:`LCKVCache` whose KV layers hold at most ``budget`` tokens each, chosen by ``method``."""

    def __init__(self, config: LCKVConfig, method: str = "streamingllm", budget: int = 256, **method_params: Any):
        super().__init__(config)
        self.policy = make_policy(method, **method_params)
        if self.policy.uses_scores:
            raise ValueError(f"method {method!r} needs attention scores, which LCKV's attention does not provide; "
                             f"use a position-based policy (window, streamingllm)")
        if not isinstance(budget, int) or budget < self.policy.min_budget():
            raise ValueError(f"budget={budget!r} must be an int >= {self.policy.min_budget()} for {method!r}")
        self.budget = budget
        self.seen = 0
        self.token_idx: dict[int, torch.Tensor] = {}  # KV layer -> [B, Hkv, n] logical index of each held token
        self.evicted = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states/value_states: [B, Hkv, q, D]
        b, h, q, _ = key_states.shape
        if self.evicted and q != 1:
            raise ValueError(f"a block of {q} tokens after eviction is not supported; feed one token at a time")
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        start = self.token_idx[layer_idx].shape[-1] if layer_idx in self.token_idx else 0
        seen = self.seen + q
        new = torch.arange(seen - q, seen, device=key_states.device).expand(b, h, q)
        held = torch.cat([self.token_idx[layer_idx], new], -1) if start else new
        self.token_idx[layer_idx] = held
        if layer_idx == self.kv_layers[-1]:  # the last KV layer of this step: the step is complete
            self.seen = seen
            self._evict()
        return keys, values

    def _evict(self) -> None:
        for l in self.kv_layers:
            layer = self.layers[l]
            if layer.keys.shape[-2] <= self.budget:
                continue
            keep = self.policy.select(_PolicyView(self.token_idx[l]), self.budget)  # [B, Hkv, budget] ascending
            idx = keep.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, idx)
            layer.values = layer.values.gather(2, idx)
            self.token_idx[l] = self.token_idx[l].gather(2, keep)
            self.evicted = True

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen (logical length), so that positions of new tokens are right after evictions."""
        return self.seen

    def physical_length(self) -> int:
        """Tokens held per KV layer."""
        return super().get_seq_length()
