"""A batched greedy decode step over the slots of a :class:`~squeezekv.runtime.pool.KVPool`, through transformers'
own hooks.

* :class:`PoolCache` is a ``transformers.Cache`` whose layers (:class:`PoolLayer`) are views on the pool: ``update``
  writes each row's new key/value at ``lengths[slot, h]`` of its slot (``index_put_``, tensor ops only, no host sync)
  and hands the whole pool layer on;
* the attention function registered in ``AttentionInterface`` under :data:`ATTN_NAME` calls
  :func:`~squeezekv.runtime.decode_attention.decode_attention` over the filled entries (plus the new one) of each row.

A step runs at a fixed batch size, a bucket (1, 2, 4, ...: the smallest power of two that holds the rows); the rows
past the real ones point at the pool's scratch slot. So on CUDA the whole model step of a bucket is captured once as a
``torch.cuda.CUDAGraph`` and replayed; on CPU (or ``use_graph=False``) the same code runs eagerly. Each row's RoPE
position is its own sequence's logical position (``pool.seen``).

Eviction, outside the graph, follows the eager path's rule exactly (``SqueezeLayer.after_attention`` with
``evict_every = chunk``): a layer of a slot that holds ``budget + chunk`` entries after a step evicts down to its
budget with the policy's own selection (``EvictionPolicy.select``, over the entries sorted by position) and is
compacted in place by hole filling (the kept entries past the budget move into the dropped ones below it: at most
``chunk`` per row and head), the buffers never move.
The budget is the admitted request's ``SqueezeLayer.decode_budget()``: window, streamingllm and h2o evict to the plan's
budget every ``chunk`` steps; snapkv (and 'none', and budget 1.0) never evicts while decoding, so its pool capacity is
``budget + max_new_tokens`` (:func:`~squeezekv.runtime.pool.pool_capacities`) and a step on a full slot raises.
H2O adds each step's softmax weights into the pool's scores inside the attention, as the eager path does.

Caches: plain squeezekv caches, the full cache (a ``DynamicCache``, into a runtime of policy ``none``), and KIVI
(a :class:`~squeezekv.runtime.kivi_pool.KiviPool`, for policies that do not evict while decoding: its residuals are
quantised after a step by ``KVPool.after_step``). Limits: models whose every layer is a full-attention layer (no
sliding windows), no other channel or cross-layer method, batch-1 requests without padding. The runtime switches
the model's attention implementation to :data:`ATTN_NAME` for the duration of each eager step (or capture) and back.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from ..cache import SqueezeCache
from ..generation import cache_kwargs
from ..registry import make_policy
from .decode_attention import BACKENDS, kernel_supports, reference_decode_attention, triton_available
from .kivi_pool import KiviPool
from .pool import KVPool

ATTN_NAME = "squeezekv_runtime"
#: policies whose decoding the runtime reproduces (what each decode query feeds them is known: H2O's weights)
SUPPORTED_POLICIES = ("window", "streamingllm", "h2o", "snapkv", "none")


@dataclass
class _Chunk:
    """Fixed buffers of a mixed bucket's prefill chunk: the next ``n`` (1..C) prompt tokens of one slot."""

    slot: torch.Tensor  # [1] int64: the prefilling slot (scratch while capturing)
    ids: torch.Tensor  # [C] int64: its tokens, zero past n
    n: torch.Tensor  # [1] int64: the real tokens
    offsets: torch.Tensor  # [C] int64: 0..C-1 (constant)
    rows: torch.Tensor  # [B] int64: 0..B-1 (constant): the decode rows' logits


@dataclass
class _Rows:
    """Fixed buffers of one batch bucket (what a captured graph reads)."""

    slots: torch.Tensor  # [B] int64: pool row of each batch row (scratch for padding rows)
    ids: torch.Tensor  # [B, 1] int64: the tokens fed
    chunk: _Chunk | None = None  # a mixed bucket's prefill chunk (its tokens follow the B decode tokens)


class PoolLayer(CacheLayerMixin):
    """One layer of a :class:`PoolCache`: a view on layer ``layer_idx`` of the pool for the rows of a bucket."""

    is_sliding = False
    is_compileable = False

    def __init__(self, runtime: "DecodeRuntime", layer_idx: int, rows: _Rows):
        super().__init__()
        self.runtime, self.layer_idx, self.rows = runtime, layer_idx, rows
        pool = runtime.pool
        self.keys, self.values = pool.keys[layer_idx], pool.values[layer_idx]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the pool holds the storage."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states/value_states: [B, H, 1, D], rotated to each row's own position (a mixed bucket: [1, H, B + C, D],
        # the B decode tokens then the chunk's C)
        pool, rows, layer = self.runtime.pool, self.rows, self.layer_idx
        model_kwargs = kwargs.get("kwargs")
        if rows.chunk is not None:
            b = rows.slots.shape[0]
            ch = rows.chunk
            start = pool.lengths[layer].index_select(0, ch.slot)[0, 0].long()  # entries the slot held before
            pool.write_chunk(layer, ch.slot, ch.n, key_states[0, :, b:], value_states[0, :, b:])
            lens = None
            if b:
                lens = pool.write(layer, rows.slots, key_states[0, :, :b].transpose(0, 1)[:, :, None],
                                  value_states[0, :, :b].transpose(0, 1)[:, :, None], self.runtime.resolved_backend)
            if isinstance(model_kwargs, dict):
                model_kwargs["squeezekv_pool_layer"] = self
                model_kwargs["squeezekv_pool_lengths"] = lens  # [B, H] (None without decode rows)
                model_kwargs["squeezekv_chunk_start"] = start
            return pool.keys[layer], pool.values[layer]
        if key_states.shape[2] != 1:
            raise ValueError(f"the decode runtime feeds one token per row, got {key_states.shape[2]}")
        lens = pool.write(layer, rows.slots, key_states, value_states, self.runtime.resolved_backend)  # [B, H] after
        if isinstance(model_kwargs, dict):
            model_kwargs["squeezekv_pool_layer"] = self
            model_kwargs["squeezekv_pool_lengths"] = lens  # [B, H]: filled entries after this write
        return pool.keys[layer], pool.values[layer]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return 0  # rows differ: the runtime passes each row's position_ids

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def reset(self) -> None:
        raise ValueError("a pool cache is reset by releasing its slots (KVPool.release)")


class PoolCache(Cache):
    """The ``transformers.Cache`` of one batch bucket: a :class:`PoolLayer` per model layer."""

    def __init__(self, runtime: "DecodeRuntime", rows: _Rows):
        super().__init__(layers=[PoolLayer(runtime, i, rows) for i in range(runtime.pool.num_layers)])


def runtime_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, softcap: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Decode attention of query ``[B, Hq, 1, D]`` over the pool layer ``key``/``value`` ``[S, Hkv, C, D]`` that
    :meth:`PoolLayer.update` returned; returns ``([B, 1, Hq, D], None)`` like transformers' attention functions."""
    layer = kwargs.get("squeezekv_pool_layer")
    if not isinstance(layer, PoolLayer):
        raise ValueError(f"the {ATTN_NAME!r} attention runs only inside DecodeRuntime steps (with its PoolCache)")
    if softcap is not None or sliding_window:
        raise ValueError("the decode runtime supports neither attention soft-capping nor sliding windows")
    runtime = layer.runtime
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    chunk = layer.rows.chunk
    if chunk is not None:  # a mixed step: query [1, Hq, B + C, D]
        b = layer.rows.slots.shape[0]
        parts = []
        if b:
            dec = _decode_rows(runtime, layer, query[0, :, :b].transpose(0, 1)[:, :, None].contiguous(), key, value,
                               kwargs["squeezekv_pool_lengths"], scale)  # [B, Hq, 1, D]
            parts.append(dec.transpose(1, 2).reshape(1, b, dec.shape[1], dec.shape[-1]))  # [1, B, Hq, D]
        out = chunk_attention(query[:, :, b:], key, value, chunk.slot, kwargs["squeezekv_chunk_start"], scale)
        parts.append(out.transpose(1, 2))  # [1, C, Hq, D]
        return torch.cat(parts, dim=1).contiguous(), None
    out = _decode_rows(runtime, layer, query, key, value, kwargs["squeezekv_pool_lengths"], scale)
    return out.transpose(1, 2).contiguous(), None


def _decode_rows(runtime: "DecodeRuntime", layer: PoolLayer, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention ``[B, Hq, 1, D]`` of the bucket's rows (query ``[B, Hq, 1, D]``) over their filled entries."""
    scores = runtime.pool.scores[layer.layer_idx] if runtime.observes_weights else None
    if isinstance(runtime.pool, KiviPool):
        out = runtime.pool.attend(layer.layer_idx, query, layer.rows.slots, lengths, float(scale),
                                  runtime.kernels if runtime.kivi_kernel else None)
    elif runtime.kernels is not None:  # the Triton kernel (support checked when the runtime was built)
        out = runtime.kernels.decode_attention(query, key, value, layer.rows.slots, lengths, float(scale), scores)
    else:
        out = reference_decode_attention(query, key, value, layer.rows.slots, lengths, scale, scores)  # [B, Hq, 1, D]
    return out


def chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot: torch.Tensor,
                    start: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a prefill chunk's queries ``[1, Hq, C, D]`` (positions ``start + j``) over its slot's
    entries of the pool layer ``key``/``value`` ``[S, Hkv, Cap, D]``: query ``j`` sees entries ``0 .. start + j``
    (a slot of policy ``none`` holds its tokens in order, the chunk's own just written); ``slot`` ``[1]`` and
    ``start`` (a 0-d tensor) live on the device, so the step is capturable. Returns ``[1, Hq, C, D]``."""
    _, hq, c, d = query.shape
    k = key.index_select(0, slot)  # [1, Hkv, Cap, D]
    v = value.index_select(0, slot)
    hkv = k.shape[1]
    group = hq // hkv
    # grouped-query attention without repeating the keys: KV head j serves query heads j*group .. (j+1)*group - 1,
    # whose C queries each become one sequence of group*C queries
    q = query.reshape(1, hkv, group * c, d)  # [1, Hkv, group*C, D]
    entries = torch.arange(k.shape[2], device=k.device)
    allowed = entries[None, :] <= (start + torch.arange(c, device=k.device))[:, None]  # [C, Cap]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.repeat(group, 1)[None, None], scale=scale)
    return out.reshape(1, hq, c, d)  # [1, Hq, C, D]


class _SlotView:
    """What ``EvictionPolicy.select`` reads of the rows ``(layers[i], slots[i])`` of the pool (layers of one
    capacity) that hold the same number ``n`` of entries and have seen the same number of tokens, stacked as a batch
    of ``len(slots)`` rows, in temporal order as the eager layer holds them (``order`` maps back to the pool's
    entries, which hole-filling compaction leaves unordered)."""

    valid = None
    sliding_window = None

    def __init__(self, pool: KVPool, layers: np.ndarray, slots: np.ndarray, n: int, seen: int):
        self.order, self.token_idx = pool.temporal_order(layers, slots, n)  # [m, H, n] each
        self.scores = None if pool.scores is None else pool.stacked_scores(layers, slots, n).gather(2, self.order)
        self.seen = seen
        self.physical_length = n


@dataclass
class _Bucket:
    rows: _Rows
    cache: PoolCache
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None  # [B, vocab], written by the graph
    fed: tuple[int, ...] | None = None  # the slots rows.slots holds (a host-to-device copy only when they change)


class DecodeRuntime:
    """Batched greedy decoding of the requests admitted into ``pool``'s slots.

    ``policy``: the eviction policy (a name or an ``EvictionPolicy``; every admitted request must use it);
    ``chunk``: decode steps between evictions (the requests' ``evict_every``); ``use_graph``: capture each bucket's
    step as a CUDA graph (default: when the pool is on CUDA); ``backend``: the decode attention's
    (:data:`~squeezekv.runtime.decode_attention.BACKENDS`).

    ``join(cache)`` admits a prefilled request and returns its slot; ``step(slots, ids)`` feeds token ``ids[i]`` to
    slot ``slots[i]`` and returns the next-token logits ``[len(slots), vocab]``; ``leave(slot)`` releases a slot."""

    def __init__(self, model: Any, pool: KVPool, policy: Any, chunk: int, *, use_graph: bool | None = None,
                 backend: str = "auto", compile: bool = False, prefill_chunk: int | None = None):
        if not isinstance(pool, KVPool):
            raise TypeError(f"pool must be a KVPool, got {type(pool).__name__}")
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r} is out of range: must be an integer >= 1")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is out of range: choose one of {BACKENDS}")
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        if getattr(self.policy, "name", None) not in SUPPORTED_POLICIES:
            raise ValueError(f"policy {getattr(self.policy, 'name', policy)!r} is not supported by the decode "
                             f"runtime: choose one of {SUPPORTED_POLICIES}")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        types = list(getattr(config, "layer_types", None) or [])
        if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in types):
            raise ValueError("the decode runtime supports models whose every layer is full attention")
        heads = config.num_key_value_heads or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if (config.num_hidden_layers, heads, head_dim) != (pool.num_layers, pool.kv_heads, pool.head_dim):
            raise ValueError(f"the model has {config.num_hidden_layers} layers of {heads} KV heads of dim {head_dim}; "
                             f"the pool {pool.num_layers} of {pool.kv_heads} of dim {pool.head_dim}")
        self.model, self.pool, self.chunk, self.backend = model, pool, chunk, backend
        # the backend decided once, outside any step (a compiled step calls the kernels' custom operators directly)
        probe = torch.empty((1, 1, 1, pool.head_dim), dtype=pool.dtype, device=pool.device)
        why = kernel_supports(probe) if backend == "triton" or (backend == "auto" and pool.device.type == "cuda"
                                                                 and triton_available()) else "torch"
        if backend == "triton" and why is not None:
            raise ValueError(f"backend='triton': the Triton decode kernels cannot run: {why}")
        self.resolved_backend = "triton" if why is None else "torch"
        self.kernels: Any = importlib.import_module(f"{__package__}.ops") if why is None else None
        self.max_context = int(getattr(config, "max_position_embeddings", 1 << 62) or (1 << 62))
        self.observes_weights = bool(self.policy.wants_weights(None, 1))  # H2O: every decode query's weights
        self.kivi_kernel = False  # a KIVI pool's decode attention by the fused kernels (else its reference)
        if isinstance(pool, KiviPool):
            if self.observes_weights:
                raise ValueError(f"policy {self.policy.name!r} scores with attention weights: the KIVI pool "
                                 "supports policies that do not evict while decoding (none, snapkv)")
            if self.resolved_backend == "triton":
                from ..channel import kivi_triton

                why = kivi_triton.supports(pool.device, pool.head_dim, pool.head_dim, pool.bits, pool.group_size,
                                           pool.dtype)
                if why is not None and backend == "triton":
                    raise ValueError(f"backend='triton': the fused KIVI kernels cannot run: {why}")
                self.kivi_kernel = why is None
        if self.observes_weights and not pool.with_scores:
            raise ValueError(f"policy {self.policy.name!r} accumulates attention: build the pool with_scores=True")
        self.use_graph = (pool.device.type == "cuda") if use_graph is None else use_graph
        if self.use_graph and pool.device.type != "cuda":
            raise ValueError("CUDA graphs need the pool on a CUDA device")
        self._joined: set[int] = set()  # slots holding a request of this runtime
        # [L, S] each joined slot's decode budget per layer: -1 where a layer only grows (snapkv, none, budget 1.0)
        self._budget_array = np.full((pool.num_layers, pool.max_seqs + 1), -1, dtype=np.int64)
        self._buckets: dict[int, _Bucket] = {}
        self._graph_pool: Any = None  # one memory pool for every bucket's graph (they replay one at a time)
        if not isinstance(compile, bool):
            raise TypeError(f"compile={compile!r} must be True or False")
        self.compile = compile
        if prefill_chunk is not None:
            if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
                raise ValueError(f"prefill_chunk={prefill_chunk!r} is out of range: an integer >= 1, or None")
            if self.policy.name != "none" or isinstance(pool, KiviPool):
                raise ValueError("prefill chunks inside the decode step need a runtime of policy 'none' on a plain "
                                 f"KVPool (the full cache), not {self.policy.name!r} on a {type(pool).__name__}")
            if prefill_chunk > min(pool.capacities):
                raise ValueError(f"prefill_chunk={prefill_chunk} is out of range: at most the smallest layer capacity "
                                 f"{min(pool.capacities)}")
        #: the prompt tokens a mixed step feeds at most (:meth:`step_chunk`); None: no mixed steps
        self.prefill_chunk = prefill_chunk
        self._mixed: dict[int, _Bucket] = {}  # mixed buckets by their number of decode rows
        # torch.compile of the model step (norms, RoPE, activations fused; the pool write and the attention stay
        # one custom operator each): compiled at the first step of a bucket, before its graph is captured; the
        # batch dimension is dynamic, so buckets of 2 rows and more share one compilation (1 is its own)
        self._compiled = torch.compile(self._forward, fullgraph=True) if compile else None
        AttentionInterface.register(ATTN_NAME, runtime_attention)

    # -- requests -------------------------------------------------------------------------------------------------
    def join(self, cache: Any) -> int:
        """Admit a prefilled request (a batch-1 ``SqueezeCache``, or a full ``DynamicCache`` into a runtime of
        policy ``none``; see :meth:`KVPool.admit`) into a free slot."""
        if isinstance(cache, DynamicCache) and all(type(x) is DynamicLayer for x in cache.layers):
            if self.policy.name != "none":  # a full cache: every token kept, nothing evicted
                raise ValueError(f"a full DynamicCache joins a runtime of policy 'none', not {self.policy.name!r}")
            budgets: list[int | None] = [None] * len(cache.layers)
        elif not isinstance(cache, SqueezeCache):
            raise TypeError(f"join needs a prefilled SqueezeCache (or a full DynamicCache), got "
                            f"{type(cache).__name__}")
        elif cache.policy.name != self.policy.name or vars(cache.policy) != vars(self.policy):
            raise ValueError(f"the request's policy {cache.policy!r} is not the runtime's {self.policy!r}")
        else:
            budgets = [layer.decode_budget() for layer in cache.layers]
        if isinstance(self.pool, KiviPool) and any(b is not None for b in budgets):
            raise ValueError("the request evicts while decoding: a KIVI pool holds requests whose policy does not "
                             "(none, snapkv)")
        if any(b is not None for b in budgets) and getattr(cache, "evict_every", self.chunk) != self.chunk:
            raise ValueError(f"the request evicts every {cache.evict_every} steps, the runtime every {self.chunk}: "
                             "build its cache with evict_every equal to the runtime's chunk")
        for i, b in enumerate(budgets):
            if b is not None and b + self.chunk > self.pool.capacities[i]:
                raise ValueError(f"layer {i}: budget {b} + chunk {self.chunk} exceeds its pool capacity "
                                 f"{self.pool.capacities[i]}")
        slot = self.pool.acquire()
        try:
            self.pool.admit(slot, cache)
        except Exception:
            self.pool.release(slot)
            raise
        self._joined.add(slot)
        self._budget_array[:, slot] = [-1 if b is None else b for b in budgets]
        return slot

    def open(self, cache: Any = None) -> int:
        """A slot for a request whose prompt is prefilled in the pool by :meth:`step_chunk` (a runtime built with
        ``prefill_chunk``): empty, or holding ``cache``, a full ``DynamicCache`` of the prompt's reused prefix
        (e.g. restored from the store)."""
        if self.prefill_chunk is None:
            raise ValueError("this runtime was built without prefill_chunk: prefill the request, then join() it")
        if cache is not None:
            return self.join(cache)
        slot = self.pool.acquire()
        self._joined.add(slot)
        self._budget_array[:, slot] = -1
        return slot

    def leave(self, slot: int) -> None:
        """Release ``slot`` (its request is done); the other slots are untouched."""
        if slot not in self._joined:
            raise ValueError(f"slot {slot!r} holds no request of this runtime")
        self._joined.discard(slot)
        self._budget_array[:, slot] = -1
        self.pool.release(slot)

    def kept_positions(self, slot: int, layer: int) -> torch.Tensor:
        """Logical positions ``[H, n]`` of the entries that ``slot`` holds in ``layer``, ascending (the eager
        ``token_idx``; the pool's own entries are in no particular order after a compaction)."""
        if slot not in self._joined:
            raise ValueError(f"slot {slot!r} holds no request of this runtime")
        if isinstance(self.pool, KiviPool):
            raise ValueError("a KIVI pool keeps the positions of its full-precision residual only")
        n = int(self.pool.host_lengths[layer][slot])
        return self.pool.temporal_order(layer, [slot], n)[1][0]

    # -- stepping -------------------------------------------------------------------------------------------------
    def bucket_size(self, n: int) -> int:
        """The batch bucket of ``n`` rows: the smallest power of two >= n up to 64, then the smallest multiple of 64
        (padding rows cost the model's matrix products, so large batches are not rounded up to a power of two)."""
        if n <= 64:
            return 1 << max(0, n - 1).bit_length()
        return -(-n // 64) * 64

    @torch.no_grad()
    def step(self, slots: Sequence[int], ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids[i]`` (``[n]`` or ``[n, 1]``) to slot ``slots[i]``; returns the next-token logits ``[n, vocab]``.
        Evicts (outside the graph) the layers of the slots that reached ``budget + chunk`` entries."""
        slots = [int(s) for s in slots]
        pool = self.pool
        if not slots or len(set(slots)) != len(slots):
            raise ValueError(f"slots={slots} must name one or more distinct slots")
        ids = ids.reshape(-1)
        if ids.shape[0] != len(slots):
            raise ValueError(f"{ids.shape[0]} tokens for {len(slots)} slots")
        for s in slots:
            if s not in self._joined:
                raise ValueError(f"slot {s} holds no request of this runtime: join() it first")
        idx = np.asarray(slots, dtype=np.int64)  # [n]
        if int(pool.host_seen[idx].max()) + 1 > self.max_context:
            s = int(idx[pool.host_seen[idx].argmax()])
            raise ValueError(f"slot {s}: the sequence would exceed the model's context of {self.max_context}")
        pool.check_room(idx)
        bucket = self._bucket(self.bucket_size(len(slots)))
        n = len(slots)
        self._fill(bucket, slots, ids)
        if bucket.graph is not None:
            bucket.graph.replay()
            logits = bucket.logits[:n].clone()
        else:
            with self._attention():
                logits = self._run(bucket)[:n]
        pool.advance_host(idx)
        self._after(idx)
        return logits

    def _fill(self, bucket: _Bucket, slots: list[int], ids: torch.Tensor) -> None:
        """Point the bucket's rows at ``slots`` (the rest at the scratch slot) and their tokens at ``ids`` ``[n]``."""
        n, rows = len(slots), bucket.rows
        if bucket.fed != tuple(slots):  # steady decoding feeds the same slots: no copy, no host wait
            rows.slots[:n].copy_(torch.tensor(slots, dtype=torch.int64), non_blocking=True)
            rows.slots[n:].fill_(self.pool.scratch)
            bucket.fed = tuple(slots)
        rows.ids[:n, 0].copy_(ids, non_blocking=True)
        if n < rows.ids.shape[0]:
            rows.ids[n:].zero_()

    @torch.no_grad()
    def step_chunk(self, slots: Sequence[int], ids: torch.Tensor, chunk_slot: int,
                   chunk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One mixed step: feed ``ids[i]`` to the decoding slot ``slots[i]`` (none: an empty list) and, in the same
        forward, the next ``c`` (1..``prefill_chunk``) prompt tokens ``chunk_ids`` ``[c]`` to ``chunk_slot`` (a
        slot of :meth:`open`), so a prompt is prefilled while the others decode at the cost of one step (Sarathi-
        style chunked prefill, Agrawal et al., OSDI 2024, arXiv 2403.02369). Returns the decode rows' next-token
        logits ``[n, vocab]`` and the chunk's last position's ``[vocab]``. On CUDA each number of decode rows'
        bucket is captured once as a graph (the chunk padded to ``prefill_chunk`` tokens)."""
        if self.prefill_chunk is None:
            raise ValueError("this runtime was built without prefill_chunk: it runs no mixed steps")
        slots = [int(s) for s in slots]
        pool = self.pool
        chunk_ids = chunk_ids.reshape(-1)
        c = int(chunk_ids.shape[0])
        if not 1 <= c <= self.prefill_chunk:
            raise ValueError(f"a chunk of {c} tokens is out of range: 1..prefill_chunk={self.prefill_chunk}")
        if len(set(slots)) != len(slots) or chunk_slot in slots:
            raise ValueError(f"slots={slots} and chunk_slot={chunk_slot} must be distinct slots")
        ids = ids.reshape(-1)
        if ids.shape[0] != len(slots):
            raise ValueError(f"{ids.shape[0]} tokens for {len(slots)} slots")
        for s in slots + [chunk_slot]:
            if s not in self._joined:
                raise ValueError(f"slot {s} holds no request of this runtime: join() or open() it first")
        idx = np.asarray(slots, dtype=np.int64)  # [n]
        both = np.asarray(slots + [chunk_slot], dtype=np.int64)
        grow = np.asarray([1] * len(slots) + [c], dtype=np.int64)  # [n + 1]: tokens each slot takes
        if int((pool.host_seen[both] + grow).max()) > self.max_context:
            s = int(both[(pool.host_seen[both] + grow).argmax()])
            raise ValueError(f"slot {s}: the sequence would exceed the model's context of {self.max_context}")
        full = pool.host_lengths[:, both] + grow > pool.host_capacities[:, None]  # [L, n + 1]
        if full.any():
            i, j = (int(x[0]) for x in np.nonzero(full))
            raise ValueError(f"slot {int(both[j])} is full in layer {i} ({pool.capacities[i]} entries): build the "
                             "pool for the prompt and the tokens to generate")
        n = len(slots)
        bucket = self._mixed_bucket(self.bucket_size(n) if n else 0)
        self._fill(bucket, slots, ids)
        ch = bucket.rows.chunk
        assert ch is not None
        ch.slot.fill_(chunk_slot)
        ch.ids[:c].copy_(chunk_ids, non_blocking=True)
        ch.ids[c:].zero_()
        ch.n.fill_(c)
        if bucket.graph is not None:
            bucket.graph.replay()
            out = bucket.logits
        else:
            with self._attention():
                out = self._run(bucket)  # [B + 1, vocab]
        logits, last = out[:n].clone(), out[-1].clone()
        pool.advance_host(idx)
        pool.host_lengths[:, chunk_slot] += c
        pool.host_seen[chunk_slot] += c
        return logits, last

    def _after(self, idx: np.ndarray) -> None:
        """Host-side work after a decode step of the slots ``idx``: evictions that are due, a KIVI pool's
        quantisation."""
        pool = self.pool
        budgets = self._budget_array[:, idx]  # [L, n]
        due = (budgets >= 0) & (pool.host_lengths[:, idx] >= budgets + self.chunk)  # [L, n]
        if due.any():
            self._evict(due, idx, budgets)
        pool.after_step(idx)  # a KIVI pool quantises the full residuals

    def _run(self, bucket: _Bucket) -> torch.Tensor:
        """One model step of ``bucket`` (compiled when the runtime compiles; a mixed bucket runs eagerly or in its
        graph)."""
        if bucket.rows.chunk is not None:
            return self._forward_mixed(bucket)
        return self._forward(bucket) if self._compiled is None else self._compiled(bucket)

    def _forward_mixed(self, bucket: _Bucket) -> torch.Tensor:
        """The decode rows' tokens and the chunk's as one packed sequence ``[1, B + C]``, each at its own position;
        returns the logits ``[B + 1, vocab]`` of the decode rows and of the chunk's last real token."""
        rows, ch = bucket.rows, bucket.rows.chunk
        assert ch is not None
        seen = self.pool.seen
        pos = torch.cat([seen.index_select(0, rows.slots), seen.index_select(0, ch.slot) + ch.offsets])  # [B + C]
        ids = torch.cat([rows.ids[:, 0], ch.ids])  # [B + C]
        keep = torch.cat([ch.rows, rows.slots.shape[0] + ch.n - 1])  # [B + 1]
        out = self.model(input_ids=ids[None], position_ids=pos[None], use_cache=True, logits_to_keep=keep,
                         **cache_kwargs(self.model, bucket.cache))
        self.pool.advance_chunk(ch.slot, ch.n)
        self.pool.advance(rows.slots)
        return out.logits[0]  # [B + 1, vocab]

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        rows = bucket.rows
        pos = self.pool.seen.index_select(0, rows.slots)[:, None]  # [B, 1]: each row's own position
        out = self.model(input_ids=rows.ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **cache_kwargs(self.model, bucket.cache))
        self.pool.advance(rows.slots)
        return out.logits[:, -1]  # [B, vocab]

    def _evict(self, due: np.ndarray, idx: np.ndarray, budgets: np.ndarray) -> None:
        """Evict the rows ``(layer, slot)`` where ``due`` ``[L, n]`` is set (``idx`` ``[n]``: the step's slots) down to
        their ``budgets`` ``[L, n]`` with the policy's selection: one selection and one compaction for each group of
        rows of one capacity holding the same number of entries, seen tokens and budget -- so every layer of the
        requests that joined together evicts in one go (a per-layer loop would pay its host-side launches once per
        layer while the GPU waits)."""
        pool = self.pool
        lay, col = np.nonzero(due)  # [m] each: the due rows
        slots = idx[col]
        key = np.stack([pool.capacity_groups[lay], pool.host_lengths[lay, slots], pool.host_seen[slots],
                        budgets[lay, col]])  # [4, m]
        groups, inverse = np.unique(key, axis=1, return_inverse=True)
        inverse = inverse.reshape(-1)
        for g in range(groups.shape[1]):
            _, n, seen, budget = (int(x) for x in groups[:, g])
            rows = inverse == g
            view = _SlotView(pool, lay[rows], slots[rows], n, seen)
            keep = self.policy.select(view, budget)  # [r, H, k]: indices into the temporal order
            pool.keep_rows(lay[rows], slots[rows], view.order.gather(2, keep))

    @contextlib.contextmanager
    def _attention(self) -> Iterator[None]:
        """The model on :data:`ATTN_NAME` for the duration of the block, then back to its implementation."""
        before = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
        self.model.set_attn_implementation(ATTN_NAME)
        try:
            yield
        finally:
            self.model.set_attn_implementation(before)

    def _bucket(self, size: int) -> _Bucket:
        bucket = self._buckets.get(size)
        if bucket is None:
            dev = self.pool.device
            rows = _Rows(slots=torch.full((size,), self.pool.scratch, dtype=torch.int64, device=dev),
                         ids=torch.zeros((size, 1), dtype=torch.int64, device=dev))
            if self.compile and size > 1:
                torch._dynamo.mark_dynamic(rows.slots, 0)
                torch._dynamo.mark_dynamic(rows.ids, 0)
            bucket = _Bucket(rows=rows, cache=PoolCache(self, rows))
            if self.use_graph:
                self._capture(bucket)
            self._buckets[size] = bucket
        return bucket

    def warm(self, rows: int) -> list[int]:
        """Build (on CUDA: capture) every bucket that a step of 1..``rows`` decode rows uses, and the mixed buckets
        of 0..``rows`` rows when the runtime prefills chunks, so that no step of a server pays a graph capture while
        requests wait. Returns the decode bucket sizes."""
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= self.pool.max_seqs:
            raise ValueError(f"rows={rows!r} is out of range: 1..{self.pool.max_seqs} (the pool's slots)")
        sizes = sorted({self.bucket_size(n) for n in range(1, rows + 1)})
        for size in sizes:
            self._bucket(size)
        if self.prefill_chunk is not None:
            for size in [0] + sizes:
                self._mixed_bucket(size)
        return sizes

    def _mixed_bucket(self, size: int) -> _Bucket:
        """The mixed bucket of ``size`` decode rows (0: the chunk alone) and a ``prefill_chunk``-token chunk."""
        bucket = self._mixed.get(size)
        if bucket is None:
            dev, c = self.pool.device, self.prefill_chunk
            assert c is not None
            chunk = _Chunk(slot=torch.full((1,), self.pool.scratch, dtype=torch.int64, device=dev),
                           ids=torch.zeros(c, dtype=torch.int64, device=dev),
                           n=torch.full((1,), c, dtype=torch.int64, device=dev),
                           offsets=torch.arange(c, device=dev), rows=torch.arange(size, device=dev))
            rows = _Rows(slots=torch.full((size,), self.pool.scratch, dtype=torch.int64, device=dev),
                         ids=torch.zeros((size, 1), dtype=torch.int64, device=dev), chunk=chunk)
            bucket = _Bucket(rows=rows, cache=PoolCache(self, rows))
            if self.use_graph:
                self._capture(bucket)
            self._mixed[size] = bucket
        return bucket

    @torch.no_grad()
    def _capture(self, bucket: _Bucket) -> None:
        # Every row points at the scratch slot while warming up and capturing: no real slot is written (and the
        # scratch row's lengths are reset by each step).
        bucket.rows.slots.fill_(self.pool.scratch)
        if bucket.rows.chunk is not None:
            bucket.rows.chunk.slot.fill_(self.pool.scratch)
            bucket.rows.chunk.n.fill_(bucket.rows.chunk.ids.shape[0])
        with self._attention():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            bucket.graph = torch.cuda.CUDAGraph()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            # One pool for all buckets: a bucket's output (its logits) stays allocated, its intermediates are free
            # again after each replay, so the graphs (never replayed at once) share them instead of each holding
            # its own -- a server growing through many buckets keeps one bucket's activations, not their sum.
            # thread_local: a server's other threads (the store's background saves) may use the GPU meanwhile
            with torch.cuda.graph(bucket.graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                bucket.logits = self._run(bucket)
