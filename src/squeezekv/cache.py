"""The compressed KV cache: a ``transformers.Cache`` whose layers evict tokens for real.

Each managed layer (:class:`SqueezeLayer`) stores, per batch row and KV head, the keys/values it kept and the logical
index of each kept token in the sequence (``token_idx``). Eviction gathers the kept positions into new, smaller
tensors, so the memory of evicted tokens is freed. ``get_seq_length()`` reports the number of tokens *seen* (so the
model derives true position ids), ``physical_length`` what is held. Masks are built per layer from ``token_idx`` by
squeezekv's attention function (:mod:`squeezekv.attention`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Iterator

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from .attention_math import eager, sdpa, weight_chunks
from .layer_storage import LayerStorage, allocated_nbytes
from .plan import Budget, BudgetPlan, cap_budgets, check_layer_budgets, tie_budgets


class SqueezeLayer(LayerStorage, CacheLayerMixin):
    """One layer's compressed KV cache: where its tokens are held (:class:`~squeezekv.layer_storage.LayerStorage`:
    buffers, appends, keeping given positions, bytes) and how the cache's policy and plan are applied to them (this
    class: when to evict and down to what, which positions a query may see, attention, static decoding).

    Tensors (``n`` = positions held, ``H`` = KV heads, ``D`` = head dim):
    ``keys``/``values`` ``[B, H, n, D]`` (rotated keys, as the model caches them), ``token_idx`` ``[B, H, n]`` int32
    (index of each held token in the logical sequence, ascending), ``scores`` ``[B, H, n]`` float32 (only for policies
    that score), ``valid`` ``[B, H, n]`` bool (False for padding; None when the batch has no padding).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    #: the layer picks its kept tokens with the eviction policy (False: it follows another layer's selection, and the
    #: policy never sees its attention)
    selects_tokens = True
    #: the layer can be driven in static (fixed-buffer, CUDA-graph) mode by :class:`squeezekv.graphs.GraphDecoder`,
    #: which refuses a cache holding a layer that cannot (checked there, before any layer moves)
    supports_static: ClassVar[bool] = True
    #: :meth:`fill` can put given keys/values in the layer (False: its tokens live in a projected basis or in storage
    #: it shares with other layers, which given keys/values do not describe)
    supports_fill: ClassVar[bool] = True

    def __init__(self, cache: "SqueezeCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self._clear_storage()
        self.prefill_done = False
        self.static: StaticState | None = None  # set while a GraphDecoder drives this layer
        #: the layer's sliding window (a query at position p sees the tokens p - window < i <= p), None for full
        #: attention; set by the cache from the model's config
        self.sliding_window: int | None = None

    # -- transformers' layer protocol ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states, value_states, with_scores=self.cache.policy.uses_scores)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states/value_states: [B, H, q, D], already rotated to their true positions
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.static is not None:
            return self._static_update(key_states, value_states, kwargs.get("kwargs"))
        q = key_states.shape[2]
        if self.seen + q > self.cache.max_context:
            raise ValueError(
                f"sequence of {self.seen + q} tokens is longer than the model's context of {self.cache.max_context}"
            )
        self._append_tokens(key_states, value_states, self._reserve(q))
        # The model hands the same kwargs dict to its attention function: this is how transformers' own paged
        # cache passes per-layer data to attention (see generation/continuous_batching/cache.py).
        model_kwargs = kwargs.get("kwargs")
        if isinstance(model_kwargs, dict):
            model_kwargs["squeezekv_layer"] = self
        return self.keys, self.values

    def _reserve(self, q: int) -> int:
        """Free slots to pre-allocate beyond the ``q`` new tokens: while decoding, room for the tokens that arrive
        before the next eviction (a layer that evicts while decoding) or a growth step (one that only grows), within
        :meth:`_cap_reserve`; none for a prompt."""
        if not self.prefill_done or q != 1:
            return 0
        budget = self.decode_budget()
        if budget is None:
            return self._cap_reserve(self.cache.growth_chunk - 1, self.physical_length + q, q)
        want = budget + self.cache.evict_every - self.physical_length - q
        return self._cap_reserve(want, self.physical_length + q, q, slack=self.cache.evict_every)

    def _cap_reserve(self, want: int, held: int, q: int, slack: int = 0) -> int:
        """At most ``want`` free slots for a buffer that will hold ``held`` tokens after this step: no more than
        ``slack`` (the tokens that arrive before the next eviction) or an eighth of ``held`` (at most
        ``growth_chunk - 1``), whichever is larger, and never room for tokens past the model's context. A layer
        growing towards a large budget thus holds at most 1/8 more slots than tokens."""
        grow = max(slack, min(self.cache.growth_chunk - 1, held // 8))
        left = self.cache.max_context - self.seen - q  # tokens that can still arrive after these q
        return max(0, min(want, grow, left))

    def decode_budget(self) -> int | None:
        """The budget this layer evicts down to while decoding (every ``evict_every`` steps), or None: it only
        grows. A sliding-window layer always drops the tokens that left its window (``window - 1`` stay visible),
        even when its policy keeps every decoded token (SnapKV) or the budget keeps everything (1.0)."""
        plan = self.cache.plan
        budget = None if plan is None else plan[self.layer_idx]
        if budget is None or not self.policy.evicts:
            return None
        if self.cache.evicts_while_decoding:
            return budget  # already capped at the window on a sliding layer
        if self.sliding_window:
            return max(1, self.sliding_window - 1)
        return None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.physical_length + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen (logical length): the model derives position ids from it."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear_storage()
        self.is_initialized = False
        self.prefill_done = False

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a compressed squeezekv cache cannot be cropped (evicted tokens are gone)")

    # -- squeezekv ----------------------------------------------------------------------------------------------
    @property
    def policy(self):
        return self.cache.policy

    def fill(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        *,
        seen: int | None = None,
    ) -> None:
        """Hold the given tokens as if a prompt of ``seen`` tokens had been prefilled and compressed to them; the
        next forward pass decodes (or prefills a further chunk) from there, evicting per the cache's plan as after a
        real prefill (the plan is resolved now if the cache can derive it).

        ``keys`` ``[B, H, n, D]`` (rotated, as the model caches them) and ``values`` ``[B, H, n, Dv]``, in the model's
        dtype, on the model's device. ``positions``: the logical index of each held token, ``[n]`` (the same in every
        row and head) or ``[B, H, n]``, integers, ascending along ``n``, each in ``0 .. seen - 1`` (default
        ``0 .. n - 1``: nothing evicted). ``scores`` ``[B, H, n]``: the policy's accumulated scores (copied, since
        policies update them in place; default zeros), only for a policy that scores. ``seen``: tokens of the prompt
        (default: the last position + 1). No padding (pass an attention mask for the whole sequence afterwards if the
        rows are left-padded: padding flags are derived from it). The layer holds exactly the given tokens, even more
        than its budget (an evicting policy drops the surplus at its next eviction); a layer that stores its tokens
        quantised quantises the given ones as it would after a prefill.

        Raises ``ValueError`` for a bad shape, dtype or range, a layer that already holds tokens, a cache whose plan
        waits for layer importance (SqueezeAttention: give the cache a ``plan``), and ``TypeError`` for a layer class
        that says ``supports_fill = False`` (low-rank, merged or shared storage)."""
        if not self.supports_fill:
            raise TypeError(f"layer {self.layer_idx} ({type(self).__name__}) cannot be filled with given keys/values: "
                            "its tokens live in a projected basis or in storage shared with other layers")
        if self.seen:
            raise ValueError(f"layer {self.layer_idx} already holds {self.seen} tokens: fill a new or reset cache")
        if self.static is not None:
            raise ValueError(f"layer {self.layer_idx} is in static (GraphDecoder) mode: close the decoder first")
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
                raise ValueError(f"fill: {name} must be a floating-point tensor [B, H, n, D], got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        b, h, n, _ = keys.shape
        if values.shape[:3] != keys.shape[:3] or values.dtype != keys.dtype or values.device != keys.device:
            raise ValueError(f"fill: values {tuple(values.shape)} {values.dtype} must match keys {tuple(keys.shape)} "
                             f"{keys.dtype} in [B, H, n], dtype and device")
        if n < 1:
            raise ValueError("fill: keys hold no token (n = 0): give at least one")
        if positions is None:
            positions = torch.arange(n, device=keys.device)
        if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.dtype == torch.bool:
            raise ValueError(f"fill: positions must be an integer tensor [n] or [B, H, n], got "
                             f"{getattr(positions, 'dtype', type(positions).__name__)}")
        if positions.shape not in ((n,), (b, h, n)):
            raise ValueError(f"fill: positions has shape {tuple(positions.shape)}; allowed: ({n},) or {(b, h, n)}")
        token_idx = positions.to(device=keys.device, dtype=torch.int32).expand(b, h, n).contiguous()  # [B, H, n]
        if n > 1 and not bool((token_idx[..., 1:] > token_idx[..., :-1]).all()):
            raise ValueError("fill: positions must be strictly ascending along n")
        last = int(token_idx[..., -1].max())
        seen = last + 1 if seen is None else seen
        if isinstance(seen, bool) or not isinstance(seen, int) or not n <= seen <= self.cache.max_context:
            raise ValueError(f"fill: seen={seen!r} is out of range: an integer in {n}..{self.cache.max_context} "
                             f"(the tokens held .. the model's context)")
        if int(token_idx.min()) < 0 or last >= seen:
            raise ValueError(f"fill: positions must lie in 0..{seen - 1} (seen={seen}), got "
                             f"{int(token_idx.min())}..{last}")
        if scores is not None:
            if not self.policy.uses_scores:
                raise ValueError(f"fill: policy {self.policy.name!r} keeps no scores; pass scores=None")
            if not isinstance(scores, torch.Tensor) or scores.shape != (b, h, n):
                raise ValueError(f"fill: scores must be a tensor {(b, h, n)}, got "
                                 f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}"
                                 )
        if self.cache.plan is None and self.cache.allocation.needs_importance:
            raise ValueError(f"fill: allocation {self.cache.allocation.name!r} derives the plan from layer importance "
                             "measured in a prefill: build the cache with a plan (plan=...) to fill it")
        self.lazy_initialization(keys, values)
        if self.policy.uses_scores:
            scores = keys.new_zeros((b, h, n), dtype=torch.float32) if scores is None else \
                scores.to(device=keys.device, dtype=torch.float32, copy=True)
        self._set_held(keys, values, token_idx, scores if self.policy.uses_scores else None, seen)
        self.prefill_done = True
        self.cache.budget_for(self.layer_idx, seen)  # resolve the plan as a prefill would
        self.flush()

    def set_padding(self, pad2d: torch.Tensor | None) -> None:
        """Derive ``valid`` from the model's 2-D padding mask ``[B, tokens seen]`` (True = real token)."""
        if pad2d is None:
            self.valid = None
            return
        if pad2d.shape[-1] != self.seen:
            raise ValueError(
                f"attention_mask covers {pad2d.shape[-1]} tokens but layer {self.layer_idx} has seen {self.seen}: "
                "pass the attention mask of the whole sequence so far"
            )
        b, h, n = self.token_idx.shape
        self.valid = pad2d.gather(1, self.token_idx.reshape(b, h * n).long()).reshape(b, h, n)

    def allowed(self, q_len: int, sliding_window: int | None) -> torch.Tensor | None:
        """Boolean mask ``[B, H or 1, q, n]`` of which held positions each new query may see; None = each query sees
        every held position up to itself, the q new tokens being the last q held (the caller then uses a
        bottom-right-aligned causal mask, or none for one query)."""
        if self.static is not None:  # slots up to the one just written; tensor ops only (graph-capturable)
            st = self.static
            slots = torch.arange(st.capacity, device=st.base_t.device)
            return (slots <= st.base_t + st.step_t).view(1, 1, 1, st.capacity)
        if not self.compressed and self.valid is None and not sliding_window:
            return None
        if self.compressed and self.valid is None and not sliding_window:
            # every held token precedes the q new ones, which are the last q held: a bottom-right-aligned causal
            # mask (one decoding query sees everything; a prefill chunk sees the kept past and itself causally)
            return None
        tok = self.token_idx if self.compressed else self.token_idx[:, :1]  # heads agree until first eviction
        q_idx = torch.arange(self.seen - q_len, self.seen, device=tok.device, dtype=tok.dtype)  # [q]
        allowed = tok[:, :, None, :] <= q_idx[:, None]  # [B, H|1, q, n]
        if sliding_window:
            allowed &= tok[:, :, None, :] > (q_idx[:, None] - sliding_window)
        if self.valid is not None:
            valid = self.valid if self.compressed else self.valid[:, :1]
            allowed &= valid[:, :, None, :]
        return allowed

    def compress(self, budget: int) -> None:
        """Keep ``budget`` positions per (row, head) chosen by the policy; the rest is freed."""
        if self.physical_length <= budget or not self.policy.evicts:
            return
        self.keep(self.policy.select(self, budget))  # [B, H, k]

    def attention_query(self, query: torch.Tensor) -> torch.Tensor:
        """The queries ``[B, Hq, q, D]`` in the space this layer's attention keys live in (what :meth:`update`
        returned and :meth:`attention_keys` gives). Extension point: a layer that attends in a projected space
        (low-rank keys) maps the queries there; the policies then score with the attention the model really uses."""
        return query

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None, scaling: float
    ) -> torch.Tensor:
        """Attention of ``query`` ``[B, Hq, q, D]`` over what ``update`` returned (``key``/``value`` ``[B, Hkv, n, D]``)
        under the boolean mask ``allowed`` ``[B|1, Hkv|1, q, n]`` (None: plain causal); returns ``[B, Hq, q, Dv]``.
        Extension point: a layer that stores keys/values differently (shared, low-rank, quantised) overrides it."""
        if self.cache.attn_backend == "eager":
            return eager(query, key, value, allowed, scaling)
        return sdpa(query, key, value, allowed, scaling)

    def weight_chunks(
        self, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None, scaling: float
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Softmaxed attention weights of chunks of ``query`` over what ``update`` returned, for policies that observe
        weights (see :func:`squeezekv.attention_math.weight_chunks`). Extension point, like :meth:`attend`."""
        return weight_chunks(query, key, allowed, scaling)

    def after_attention(self, q_len: int) -> None:
        """Called by the attention function once the new queries attended: evict if the plan says so."""
        if self.static is not None:
            return  # the GraphDecoder evicts between captured steps
        budget = self.cache.budget_for(self.layer_idx, self.seen)
        if budget is None:
            return  # plan waits for every layer's importance (SqueezeAttention): the cache compresses at the end
        decoding = self.prefill_done and q_len == 1
        if not decoding:
            self.prefill_done = True
            self.compress(budget)
            return
        budget = self.decode_budget()
        if budget is not None and self.physical_length >= budget + self.cache.evict_every:
            self.compress(budget)

    # -- static decoding (CUDA graphs) --------------------------------------------------------------------------
    def enter_static(self, chunk: int, step_t: torch.Tensor, seen_t: torch.Tensor) -> None:
        """Move the held tokens into buffers with ``chunk`` free slots and switch ``update``/``allowed`` to
        fixed-shape tensor ops: step ``k`` of a chunk writes slot ``base + k`` (``step_t`` = k, ``seen_t`` = the new
        token's logical index, both device tensors the driver advances). Only for a layer whose class says
        :attr:`supports_static` (the driver checks)."""
        budget = self.cache.plan[self.layer_idx]
        n = self.physical_length
        capacity = min(max(budget, n), self.cache.max_context) + chunk  # never room for more than the context
        self._into_fixed_buffers(capacity)
        self.static = StaticState(
            capacity=capacity, budget=budget, base=n, base_t=torch.tensor([n], device=self.device),
            step_t=step_t, seen_t=seen_t,
        )

    def _static_update(self, key_states: torch.Tensor, value_states: torch.Tensor, model_kwargs: Any):
        st = self.static
        slot = st.base_t + st.step_t  # [1] int64
        self._write_slot(slot, key_states, value_states, st.seen_t)  # key_states: [B, H, 1, D]
        if isinstance(model_kwargs, dict):
            model_kwargs["squeezekv_layer"] = self
        return self.keys, self.values

    def static_evict(self, steps: int) -> None:
        """After ``steps`` captured steps: evict down to the budget and compact into the same buffers (their
        addresses must not change under a captured graph)."""
        st = self.static
        bufs = self._fixed_buffers()
        self._use_prefix(bufs, st.base + steps)
        self.static = None
        self.compress(st.budget)
        k = self._compact_into(bufs)
        st.base = k
        st.base_t.fill_(k)
        self.static = st

    def leave_static(self, steps: int) -> None:
        """Back to the dynamic mode, holding the ``base + steps`` filled slots."""
        st = self.static
        self._use_prefix(self._fixed_buffers(), st.base + steps)
        self.static = None


@dataclass
class StaticState:
    """Where a layer in static mode writes: slot ``base_t + step_t``; ``capacity`` slots are allocated."""

    capacity: int
    budget: int
    base: int
    base_t: torch.Tensor  # [1] int64, == base
    step_t: torch.Tensor  # [1] int64, shared by all layers
    seen_t: torch.Tensor  # [1] int64, logical index of the token being decoded


class SqueezeCache(Cache):
    """A ``transformers.Cache`` that compresses each layer to the budget of a :class:`BudgetPlan`.

    Build it with :func:`squeezekv.make_cache`, which also attaches squeezekv's attention function and hooks to the
    model. Layers of type ``full_attention`` are managed; in hybrid models (Gemma 3) the sliding-window layers are left
    to transformers' own bounded ``DynamicSlidingWindowLayer``; in models whose every layer has the same sliding window
    (Mistral) every layer is managed, the window is applied in the mask, each layer's budget is capped at the
    ``window - 1`` tokens a later query can still see, and tokens that left the window are never kept over ones inside
    it.
    """

    def __init__(
        self,
        config: Any,
        policy: Any,
        budget: float | int | str | Budget,
        allocation: Any,
        *,
        plan: BudgetPlan | None = None,
        evict_every: int = 1,
        attn_backend: str = "sdpa",
        channel: Any = None,
        crosslayer: Any = None,
    ):
        """``policy``/``allocation``/``channel``/``crosslayer``: built method objects (an
        :class:`~squeezekv.policies.base.EvictionPolicy`, an :class:`~squeezekv.allocation.base.Allocation`, a
        channel and a cross-layer method or ``None``); :func:`squeezekv.build.build_cache` makes them from a
        :class:`~squeezekv.spec.CacheSpec`, :func:`squeezekv.make_cache` also attaches the model."""
        for name, obj, need in (("policy", policy, "select"), ("allocation", allocation, "allocate")):
            if isinstance(obj, str) or not hasattr(obj, need):
                raise TypeError(f"{name}={obj!r} must be a built {name} object (squeezekv.build.build_parts makes "
                                "them from a CacheSpec; squeezekv.make_cache takes names)")
        self.policy = policy
        self.channel = channel
        self.crosslayer = crosslayer
        self.allocation = allocation
        #: the CacheSpec this cache was built from (set by squeezekv.build.build_cache; None when built by hand)
        self.spec: Any = None
        self.budget = Budget.parse(budget)
        if not isinstance(evict_every, int) or evict_every < 1:
            raise ValueError(f"evict_every={evict_every!r} is out of range: must be an integer >= 1")
        if attn_backend not in ("sdpa", "eager"):
            raise ValueError(f"attn_backend={attn_backend!r} is not supported: choose 'sdpa' or 'eager'")
        self.evict_every = evict_every
        self.growth_chunk = 64  # slots a growing (never-evicting) layer reserves at a time while decoding
        self.attn_backend = attn_backend
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_context = int(getattr(text_config, "max_position_embeddings", 1 << 62) or (1 << 62))
        num_layers = text_config.num_hidden_layers
        layer_types = list(getattr(text_config, "layer_types", None) or [])
        window = getattr(text_config, "sliding_window", None)
        if not layer_types:
            layer_types = ["sliding_attention" if window else "full_attention"] * num_layers
        all_sliding = all(t == "sliding_attention" for t in layer_types)
        self.num_layers = num_layers
        # known before the layer objects are made, so make_layer can pair or group managed layers
        self.managed: tuple[int, ...] = tuple(
            i for i, kind in enumerate(layer_types)
            if kind == "full_attention" or (kind == "sliding_attention" and all_sliding)
        )
        layers: list[CacheLayerMixin] = []
        for i, kind in enumerate(layer_types):
            if i in self.managed:
                layer = self.make_layer(i)
                layer.sliding_window = window if kind == "sliding_attention" and window else None
                layers.append(layer)
            elif kind == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
            else:
                raise ValueError(f"layer {i} has type {kind!r}, which squeezekv does not support")
        super().__init__(layers=layers)
        self.layer_types = tuple(layer_types)
        if self.crosslayer is not None:
            self.crosslayer.bind(self)
        if plan is not None:
            self._check_plan(plan)
            plan = self._with_fitted(plan)
        self._given_plan = plan
        self.plan: BudgetPlan | None = plan
        self.importance: dict[int, float] = {}
        #: the model's tensor-parallel group when it is sharded (set by make_cache, see squeezekv.distributed)
        self.tp: Any = None
        self.pending_hidden: dict[int, torch.Tensor] = {}
        #: length of the whole prompt when it arrives in chunks (:func:`squeezekv.chunked_prefill`): a fraction
        #: budget is a fraction of it, not of the first chunk
        self.prompt_length_hint: int | None = None

    def make_layer(self, layer_idx: int) -> SqueezeLayer:
        """The layer object of managed layer ``layer_idx``. Extension point: the cross-layer method decides first
        (e.g. a layer that holds only values), then the channel method (e.g. packed low-bit codes), else a plain
        :class:`SqueezeLayer`."""
        if self.crosslayer is not None:
            layer = self.crosslayer.make_layer(self, layer_idx)
            if layer is not None:
                return layer
        if self.channel is not None:
            return self.channel.make_layer(self, layer_idx)
        return SqueezeLayer(self, layer_idx)

    # -- plan -----------------------------------------------------------------------------------------------------
    def _check_plan(self, plan: BudgetPlan) -> None:
        if len(plan) != len(self.layers):
            raise ValueError(f"plan has {len(plan)} layers but the model has {len(self.layers)}")
        for i in range(len(self.layers)):
            if (plan[i] is None) != (i not in self.managed):
                raise ValueError(f"plan layer {i}: budget {plan[i]!r} does not match whether the layer is managed")
        # every policy shipped here fits any budget >= 1 (fitted); a registered policy may declare a larger minimum
        check_layer_budgets(plan.budgets, self.policy.min_budget(), f"policy {self.policy.name!r}")
        for group in self.tied_layers():
            if len({plan[i] for i in group}) > 1:
                raise ValueError(
                    f"plan gives layers {list(group)} the budgets {[plan[i] for i in group]}, but they must keep the "
                    f"same tokens ({self.crosslayer.describe()} ties them): give them one budget"
                )

    def _with_fitted(self, plan: BudgetPlan, prompt_length: int | None = None) -> BudgetPlan:
        """``plan`` with ``details["policy_fitted"]``: the policy parameters each layer's budget shrinks, as
        ``{"window 64 -> 10": [layers]}``, for the layers that can evict at that budget (absent when the policy runs
        as configured everywhere)."""
        fitted: dict[str, list[int]] = {}
        for i, b in enumerate(plan.budgets):
            window = getattr(self.layers[i], "sliding_window", None)
            if b is None or (window and b >= window - 1):
                continue  # not managed, or a sliding layer that keeps every token a later query can see
            if prompt_length is not None and b >= prompt_length and not self.evicts_while_decoding:
                continue  # the budget covers the prompt and nothing is evicted while decoding
            for name, (configured, used) in self.policy.fitted(b).items():
                fitted.setdefault(f"{name} {configured} -> {used}", []).append(i)
        if not fitted:
            return plan
        return replace(plan, details={**plan.details, "policy_fitted": fitted})

    @property
    def keeps_everything(self) -> bool:
        """The budget is the fraction 1.0: nothing is evicted while decoding (and a derived plan covers the prompt),
        except
        the tokens that left a sliding window. A restored snapshot (fixed plan, same budget) keeps the rule."""
        return self.budget.is_fraction and self.budget.value >= 1.0

    @property
    def evicts_while_decoding(self) -> bool:
        """Layers evict down to their budget again while decoding (window, streamingllm, h2o; not at budget 1.0)."""
        return self.policy.keeps_evicting and not self.keeps_everything

    def tied_layers(self) -> list[tuple[int, ...]]:
        """Groups of layers that must keep exactly the same tokens (one budget per group), from the cross-layer
        method."""
        return [] if self.crosslayer is None else list(self.crosslayer.tied_layers())

    @property
    def collecting_importance(self) -> bool:
        return self.plan is None and self.allocation.needs_importance

    def resolve_plan(self, prompt_length: int) -> BudgetPlan:
        """Derive the plan for a prompt of ``prompt_length`` tokens (SqueezeAttention: once importance is known);
        while a chunked prefill runs, the whole prompt's length (``prompt_length_hint``) is used instead."""
        if self.prompt_length_hint is not None:
            prompt_length = self.prompt_length_hint
        base = self.budget.tokens(prompt_length)
        importance = None
        if self.allocation.needs_importance:
            missing = [i for i in self.managed if i not in self.importance]
            if missing:
                raise RuntimeError(
                    f"allocation {self.allocation.name!r} needs layer importance but layers {missing} were not "
                    "measured: build the cache with squeezekv.make_cache(model, ...) so the model's hooks are attached"
                )
            importance = [self.importance[i] for i in self.managed]
            if self.tp is not None:  # every rank must derive the same plan: use rank 0's importances
                importance, tp_diff = self.tp.agree("SqueezeAttention layer importance", importance)
        budgets, details = self.allocation.allocate(base, len(self.managed), importance)
        if importance is not None and self.tp is not None:
            details = {**details, "tp_importance_max_diff": tp_diff}
        if self.budget.is_fraction:
            # A fraction is relative to the prompt: no layer can use more than the whole prompt, so what an
            # allocation gives beyond it goes to the other layers (total unchanged).
            budgets, moved = cap_budgets(budgets, prompt_length)
            if moved:
                details = {**details, "capped_at_prompt_length": prompt_length, "tokens_redistributed": moved}
        elif max(budgets) > self.max_context:
            # no layer can ever hold more tokens than the model's context
            budgets, moved = cap_budgets(budgets, self.max_context)
            details = {**details, "capped_at_context": self.max_context, "tokens_redistributed": moved}
        full: list[int | None] = [None] * len(self.layers)
        for i, b in zip(self.managed, budgets):
            full[i] = int(b)
        capped = [i for i in self.managed if self.layers[i].sliding_window and full[i] >= self.layers[i].sliding_window]
        if capped and self.policy.evicts:  # ('none' keeps every token whatever the budget)
            # a sliding layer's later queries see only the window - 1 tokens before them
            cap = max(1, self.layers[capped[0]].sliding_window - 1)
            for i in capped:
                full[i] = cap
            details = {**details, "capped_at_sliding_window": {"tokens": cap, "layers": capped}}
        groups = self.tied_layers()
        if groups:
            full = tie_budgets(full, groups)
            details = {**details, "tied_layers": [list(g) for g in groups]}
        plan = BudgetPlan(
            budgets=tuple(full),
            base=base,
            allocation=self.allocation.name,
            details={"budget": str(self.budget), "prompt_length": prompt_length, **details},
        )
        check_layer_budgets(plan.budgets, self.policy.min_budget(), f"policy {self.policy.name!r}")
        if self.keeps_everything:
            plan = replace(plan, details={**plan.details, "decoding": "no eviction (budget 1.0 keeps every token)"})
        plan = self._with_fitted(plan, prompt_length)
        self.plan = plan
        return plan

    def budget_for(self, layer_idx: int, seen: int) -> int | None:
        if self.plan is None:
            if self.allocation.needs_importance:
                return None
            self.resolve_plan(seen)
        return self.plan[layer_idx]

    def record_importance(self, layer_idx: int, value: float, prompt_length: int) -> None:
        """Store one layer's importance; once every managed layer has one, resolve the plan and compress."""
        self.importance[layer_idx] = float(value)
        if self.plan is None and all(i in self.importance for i in self.managed):
            self.resolve_plan(prompt_length)
            for i in self.managed:
                layer = self.layers[i]
                layer.prefill_done = True
                layer.compress(self.plan[i])

    # -- memory ---------------------------------------------------------------------------------------------------
    def layer_nbytes(self) -> list[int]:
        """Bytes allocated by each layer (keys, values and squeezekv's per-token bookkeeping)."""
        out = []
        for layer in self.layers:
            if isinstance(layer, SqueezeLayer):
                out.append(layer.nbytes())
            else:
                out.append(allocated_nbytes((getattr(layer, "keys", None), getattr(layer, "values", None))))
        return out

    def nbytes(self) -> int:
        return sum(self.layer_nbytes())

    def kv_nbytes(self) -> int:
        """Bytes of keys and values only (without token indices and scores)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, SqueezeLayer):
                total += layer.kv_nbytes()  # a layer that stores K/V differently knows its own bytes
            else:
                total += allocated_nbytes((getattr(layer, "keys", None), getattr(layer, "values", None)))
        return total

    def physical_lengths(self) -> list[int]:
        out = []
        for layer in self.layers:
            if isinstance(layer, SqueezeLayer):
                out.append(layer.physical_length)
                continue
            keys = getattr(layer, "keys", None)
            out.append(0 if not isinstance(keys, torch.Tensor) or keys.dim() < 3 else keys.shape[-2])
        return out

    def reset(self) -> None:
        super().reset()
        self.plan = self._given_plan
        self.importance.clear()
        self.pending_hidden.clear()
        self.prompt_length_hint = None

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.policy.name,
            "method_params": {k: v for k, v in vars(self.policy).items()},
            "allocation": self.allocation.name,
            "allocation_params": {k: v for k, v in vars(self.allocation).items()},
            "budget": str(self.budget),
            "evict_every": self.evict_every,
            "channel": None if self.channel is None else self.channel.describe(),
            "crosslayer": None if self.crosslayer is None else self.crosslayer.describe(),
            "plan": None if self.plan is None else self.plan.as_dict(),
        }


def dynamic_cache_nbytes(cache: Cache) -> int:
    """Bytes allocated for the keys and values of any transformers cache (e.g. the full ``DynamicCache``), counted as
    :meth:`SqueezeCache.nbytes` counts them: the storage behind each tensor, once per storage
    (:func:`allocated_nbytes`). Right after a prefill, a sliding-window layer's ``window - 1`` view still holds the
    whole prompt's tensor alive, and that is what is counted."""
    seen: set[tuple[str, int]] = set()
    return sum(allocated_nbytes((getattr(layer, "keys", None), getattr(layer, "values", None)), seen)
               for layer in cache.layers)


__all__ = ["SqueezeCache", "SqueezeLayer", "allocated_nbytes", "dynamic_cache_nbytes", "DynamicLayer"]
