"""The serving engine: one thread owns the model; requests are admitted fairly, prefilled with KV reused from the
store, decoded step by step interleaved with the other running requests, and their KV is saved asynchronously when
they finish (CachedAttention / AttentionStore, Gao et al., USENIX ATC 2024, arXiv 2403.19708).

* Admission: one FIFO queue per user (the request's ``user`` field, else the request itself), served round-robin, so a
  client with many requests cannot starve the others; at most ``max_active`` requests run at once and at most
  ``max_queue`` wait (more: :class:`QueueFull`).
* A request entering the queue is announced to the store (queue-aware eviction and prefetch).
* Iteration-level scheduling (Orca, OSDI 2022): every engine iteration advances each running request by one step
  (its prefill, or one decode token), so new requests start between the decode steps of long ones; the decode steps
  of the running full-cache requests are batched into one forward (their KV left-padded and masked, each row at its
  own position). Compressed caches decode one by one -- unless the engine has a decode runtime
  (``runtime_slots`` > 0): then every prefilled request whose cache the runtime supports (the full cache, plain
  squeezekv caches of window, StreamingLLM, H2O, SnapKV or none, KIVI with none or SnapKV, see
  :mod:`squeezekv.runtime`) joins a slot of its KV pool, and the running requests of all slots decode in ONE
  batched step (a CUDA graph per batch bucket on the GPU), joining and leaving without touching the others' KV; a
  finished request's slot is exported back into its cache for the store. Admission then counts free slots:
  ``max_active`` bounds only the requests outside the pool, and a request waits while every slot is taken
  (:meth:`Engine._room`); ``runtime_slots="auto"`` sizes the pool by the device's free memory.
  A request the pool cannot hold (no free slot, a layer's kept tokens plus what it may generate over the slot's
  ``runtime_slot_tokens``) decodes on its own as before (metric ``runtime_fallback_total``).
* Chunked prefill (a cache specification with ``prefill_chunk``, or ``EngineConfig.prefill_chunk`` for the full
  cache): a new prompt is fed a chunk per engine iteration, so the decode steps of the running requests go on
  between the chunks of a long prompt. While requests decode, an iteration starts no further prefill step once it
  has fed ``prefill_budget`` prompt tokens (default: one chunk) over all prefilling requests, oldest first -- a
  burst of new requests then delays a decode step by about one chunk, not by all their prompts; with nothing
  decoding, every prefilling request advances.
* Prefill inside the decode step (the full cache on the runtime with ``prefill_chunk``): a new request takes its
  slot at once (empty, or holding its reused history copied from the store) and its prompt is fed to the slot one
  chunk per engine iteration in the SAME forward as the running requests' decode tokens
  (:meth:`~squeezekv.runtime.runtime.DecodeRuntime.step_chunk`, Sarathi-style), so a step with a chunk costs about
  one step, not a step plus a prefill. The chunk goes to the request with the fewest prompt tokens left (a turn
  reusing its history answers before long recomputations end), unless one has waited :data:`STARVE_STEPS` steps.
* Truncation (``truncation="rerotate"``): a prompt longer than the context keeps its newest tokens; the stored KV of
  the untruncated history is cut and its keys re-rotated to their new positions (the paper's method, exact in a
  one-layer model, an approximation in deeper ones). ``"error"`` (default) rejects such prompts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..generation import cache_kwargs
from ..spec import CacheSpec
from ..store import KVStore, LayerwiseLoad, capture, shift_positions
from .detok import StreamText
from .metrics import Metrics
from .sampling import MIN_TEMPERATURE, sample_rows

log = logging.getLogger("squeezekv.serve")



def _max_token_chars(tokenizer: Any) -> int | None:
    """Most characters one token can stand for (a bound on a text's length given its token count): the tokenizer's
    ``max_token_chars`` if it has one, else the longest vocabulary entry plus one (a prefix space); None if the
    tokenizer lists no vocabulary."""
    explicit = getattr(tokenizer, "max_token_chars", None)
    if explicit is not None:
        return int(explicit)
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    vocab = get_vocab()
    return (max((len(t) for t in vocab), default=0) + 1) if vocab else None


def _batchable(cache: Any) -> bool:
    """Full caches whose every layer holds every token can be decoded together (compressed and sliding ones not)."""
    return type(cache) is DynamicCache and all(type(l) is DynamicLayer for l in cache.layers)


def _drop_kv(cache: Any) -> None:
    """Free the tensors of a cache whose state a runtime slot now holds (it would otherwise stay allocated beside its
    copy in the pool for the whole request): each layer keeps its type and bookkeeping, with empty keys, values,
    positions and scores of the same dtypes and devices, which :meth:`KVPool.export` overwrites."""
    for layer in cache.layers:
        names = layer._tensors() if hasattr(layer, "_tensors") else ["keys", "values"]  # KIVI: its codes too
        for name in names:
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() >= 3:
                setattr(layer, name, t.new_empty((*t.shape[:2], 0, *t.shape[3:])))  # [1, H, 0(, D)]
        if getattr(layer, "_buffers", None):
            layer._buffers = {}


#: ``GenRequest.prefilling`` of a request prefilling in its runtime slot (its chunks go into the decode steps)
_IN_POOL = object()
#: decode steps a request prefilling in the pool waits for a chunk before it goes ahead of shorter prompts
STARVE_STEPS = 32


class QueueFull(Exception):
    """More requests wait than ``max_queue``."""


class RequestRejected(Exception):
    """A valid request this server's configuration cannot run (answered with ``status``, a 4xx, not a 500)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param


@dataclass
class EngineConfig:
    """What the engine runs: ``cache`` None = the full cache, else the compressed cache a
    :class:`~squeezekv.spec.CacheSpec` (or its text form) describes — eviction, allocation, channel and cross-layer
    methods alike.

    ``runtime_slots``: 0 (no decode runtime), the decode runtime's pool slots, or ``"auto"`` (as many slots of
    ``runtime_slot_tokens`` entries per layer as the device's free memory holds when the pool is built, less
    ``runtime_reserve_gib``: admission by bytes); ``save_finished``: save each finished request's KV in the store for
    its next turn (off: nothing is exported or saved); ``prefill_chunk``: the full cache's new prompts are prefilled
    this many tokens per engine iteration (a compressed cache takes its specification's ``prefill_chunk``);
    ``prefill_budget``: while other requests decode, an engine iteration starts no further prefill step once it has
    fed this many prompt tokens over all prefilling requests (so it feeds less than the budget plus one step);
    None: one prefill chunk with chunked prefill, no limit without it. With the runtime on and the full cache,
    ``prefill_chunk`` makes new prompts prefill in their slots instead, one chunk inside each decode step (the
    budget does not apply: a step carries one chunk). ``runtime_warmup``: on CUDA, capture the graph of every batch
    bucket when the runtime is built (else each at its first step, while requests wait)."""

    model_name: str = "squeezekv"
    cache: CacheSpec | None = None
    device: str = "cpu"
    max_active: int = 8
    max_queue: int = 256
    max_new_tokens: int = 512
    truncation: str = "error"
    batch_decode: bool = True
    runtime_slots: int | str = 0
    runtime_slot_tokens: int = 4096
    runtime_compile: bool = False
    runtime_reserve_gib: float = 4.0
    save_finished: bool = True
    prefill_chunk: int | None = None
    prefill_budget: int | None = None
    runtime_warmup: bool = True

    def __post_init__(self) -> None:
        if self.cache is not None and not isinstance(self.cache, CacheSpec):
            self.cache = CacheSpec.of(self.cache)

    def validate(self) -> None:
        if self.prefill_chunk is not None and self.cache is not None:
            raise ValueError("prefill_chunk is the full cache's: a compressed cache takes the prefill_chunk of its "
                             "specification")
        for name in ("max_active", "max_queue", "max_new_tokens", "runtime_slot_tokens") + (
                ("prefill_chunk",) if self.prefill_chunk is not None else ()) + (
                ("prefill_budget",) if self.prefill_budget is not None else ()):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} is out of range: must be an integer >= 1")
        for name in ("runtime_compile", "save_finished", "batch_decode", "runtime_warmup"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.runtime_slots != "auto" and (not isinstance(self.runtime_slots, int)
                                             or isinstance(self.runtime_slots, bool) or self.runtime_slots < 0):
            raise ValueError(f"runtime_slots={self.runtime_slots!r} is out of range: an integer >= 0 (0: no runtime) "
                             "or 'auto' (as many slots as the device's free memory holds)")
        r = self.runtime_reserve_gib
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1 << 20:
            raise ValueError(f"runtime_reserve_gib={r!r} is out of range: a number of GiB >= 0")
        if self.truncation not in ("error", "rerotate"):
            raise ValueError(f"truncation={self.truncation!r} is not supported: 'error' or 'rerotate'")
        if self.truncation == "rerotate" and self.cache is not None:
            raise ValueError("truncation='rerotate' needs the full cache: compressed caches cannot be re-rotated")


@dataclass
class GenRequest:
    """One generation. ``emit`` receives events (called from the engine thread): ``{"type": "delta", "text"}``,
    ``{"type": "done", "finish_reason", "usage"}``, ``{"type": "error", "message"}`` (with ``"status"``,
    ``"code"`` and ``"param"`` when the request was rejected rather than failed).

    ``user``: the fairness identity (one queue each); ``scope``: the KV store scope its cache is looked up in and
    saved to (None: the shared, unscoped namespace)."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[dict[str, Any]], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    user: str | None = None
    scope: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: threading.Event = field(default_factory=threading.Event)
    checked_at: float = field(default_factory=time.monotonic)  # when the app last checked its client was there
    # state, owned by the engine thread
    t_submit: float = 0.0
    cache: Any = None
    fed: list[int] = field(default_factory=list)  # tokens the cache has seen
    logits: torch.Tensor | None = None  # [vocab] for the next token
    generated: list[int] = field(default_factory=list)
    detok: StreamText | None = None
    cached_tokens: int = 0
    reused_tokens: tuple[int, ...] = ()
    truncated: int = 0
    generator: torch.Generator | None = None
    slot: int | None = None  # the decode runtime's slot holding this request's KV (None: its own cache)
    join_tried: bool = False  # offered to the decode runtime once its prefill ended (joined or not)
    prefilling: Any = None  # the chunked prefill still running (a chunked_prefill_steps generator), one chunk a step
    prefill_tokens: list[int] = field(default_factory=list)  # what that prefill feeds (in the pool: what is left)
    chunk_wait: int = 0  # decode steps since its last chunk (prefilling in the pool)
    #: a function returning a cache that already holds the KV of ``prompt[:-1]`` (a benchmark placing long
    #: histories directly, as random KV of the right shape): the engine then feeds only the prompt's last token
    prefilled: Callable[[], Any] | None = None


class Engine:
    """Runs ``model`` on its own thread; :meth:`submit` is thread-safe."""

    def __init__(self, model: Any, tokenizer: Any, store: KVStore, config: EngineConfig,
                 metrics: Metrics | None = None):
        config.validate()
        self.model, self.tokenizer, self.store, self.config = model, tokenizer, store, config
        self.metrics = metrics or Metrics()
        self.device = torch.device(config.device)
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or (1 << 30))
        self.max_token_chars = _max_token_chars(tokenizer)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos: set[int] = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        self.waiting: "OrderedDict[str, deque[GenRequest]]" = OrderedDict()
        self.n_waiting = 0
        self.active: list[GenRequest] = []
        self.reuse_log: deque[tuple[str, tuple[int, ...], tuple[int, ...]]] = deque(maxlen=100_000)
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="squeezekv-engine", daemon=True)
        #: why finished requests are not saved for reuse (None: they are): the store refused the cache's layer type,
        #: or ``save_finished`` is off
        self.reuse_off: str | None = None if config.save_finished else "save_finished=False"
        self.runtime: Any = None  # the DecodeRuntime, built at the first request that can join it
        #: why requests do not decode on the runtime (None: they may)
        self.runtime_off: str | None = None if config.runtime_slots else "runtime_slots=0"
        if config.cache is not None:
            from .. import make_cache

            config.cache.validate()  # fail early on bad names and parameters
            spec = config.cache
            self._make_cache = lambda: make_cache(model, spec)
        else:
            self._make_cache = lambda: DynamicCache(config=model.config)
        chunk = config.prefill_chunk if config.cache is None else config.cache.prefill_chunk
        #: prompt tokens an iteration feeds while requests decode (None: no limit)
        self.prefill_budget: int | None = chunk if config.prefill_budget is None else config.prefill_budget
        self._prefill_spent = 0  # prompt tokens fed in this iteration
        #: the most prompt tokens one iteration fed while other requests decoded (what the budget bounds)
        self.busiest_prefill = 0

    # -- public -----------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        self.store.close()

    def max_prompt_tokens(self, max_tokens: int) -> int:
        return self.context - max_tokens

    def shortest_prompt(self, longest: int = 4096) -> tuple[int | None, str]:
        """The shortest prompt length (1, 2, 4, ... up to ``longest``) the configured cache can prefill, and the
        error of the longest one that failed ("" if none failed). Runs the model: call it before :meth:`start`.
        The full cache runs any prompt: ``(1, "")``."""
        if self._thread.is_alive():
            raise ValueError("shortest_prompt runs the model: call it before start()")
        if self.config.cache is None:
            return 1, ""
        token = next(iter(self.eos), 0)
        error, n = "", 1
        with torch.no_grad():
            while n <= min(longest, self.context - 1):
                cache = self._make_cache()
                ids = torch.full((1, n), token, dtype=torch.long, device=self.device)  # [1, n]
                try:
                    self.model(input_ids=ids, use_cache=True, **cache_kwargs(self.model, cache))
                    return n, error
                except ValueError as err:
                    error = str(err)
                n *= 2
        return None, error

    def submit(self, req: GenRequest) -> None:
        """Queue ``req`` (raises :class:`QueueFull` beyond ``max_queue`` waiting requests). May read the disk tier
        (prefetch): call it off the event loop."""
        with self._cv:
            if self.n_waiting >= self.config.max_queue:
                raise QueueFull(f"{self.n_waiting} requests are waiting (max_queue={self.config.max_queue})")
        req.t_submit = time.perf_counter()
        # announced before it can be admitted (admission dequeues it): queue-aware eviction + prefetch
        try:
            self.store.enqueue(req.id, req.prompt, scope=req.scope)
        except Exception as err:  # the store is an optimisation: its failure is a miss, never a failed request
            log.warning("KV store prefetch failed: %s: %s", type(err).__name__, err)
            self.metrics.inc("store_errors_total")
        with self._cv:
            self.waiting.setdefault(req.user or req.id, deque()).append(req)
            self.n_waiting += 1
            self._cv.notify_all()

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the tokenizer's chat template, with the assistant prompt appended."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: use /v1/completions")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer(text)["input_ids"]]

    @property
    def queue_length(self) -> int:
        return self.n_waiting

    # -- the engine thread ------------------------------------------------------------------------------------
    def _room(self) -> bool:
        """Whether one more request may start. Without the runtime: fewer than ``max_active`` run. With it, the
        requests in its slots do not count: fewer than ``max_active`` run outside them (prefilling, or decoding on
        their own), and, once the pool exists, a free slot is left for each of them and the newcomer -- so the
        server holds as many conversations as the pool has slots, and a full pool makes requests wait rather than
        decode one by one."""
        if self.runtime_off is not None:
            return len(self.active) < self.config.max_active
        outside = sum(1 for r in self.active if r.slot is None)
        if outside >= self.config.max_active:
            return False
        return self.runtime is None or self.runtime.pool.free_slots() > outside or not self.active

    def _admit(self) -> None:
        with self._cv:
            while self.waiting and self._room():
                user, q = next(iter(self.waiting.items()))
                req = q.popleft()
                self.n_waiting -= 1
                del self.waiting[user]
                if q:
                    self.waiting[user] = q  # to the back of the round
                self.active.append(req)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self.active:
                    self._cv.wait(timeout=0.5)
                if self._stop:
                    break
            t0 = time.perf_counter()
            self._admit()
            ready: list[GenRequest] = []
            self._prefill_spent = 0
            budget = self.prefill_budget
            if budget is not None and not any(r.cache is not None and r.prefilling is None for r in self.active):
                budget = None  # nothing decodes: no decode step to keep short
            for req in list(self.active):
                try:
                    if req.cancelled.is_set():
                        self._finish(req, "cancelled")
                        continue
                    if budget is not None and self._prefill_spent >= budget and (
                            req.cache is None or req.prefilling not in (None, _IN_POOL)):
                        self.metrics.inc("prefill_deferred_total")
                        continue  # this iteration's prompt tokens are spent: its next prefill step waits
                    if req.prefilling is _IN_POOL:
                        continue  # its next chunk goes into this iteration's decode step (_feed)
                    if req.cache is None:
                        self._prefill(req)
                    elif req.prefilling is not None:
                        self._prefill_step(req)
                    if req.prefilling is None:  # (else its next chunk in the next iteration)
                        ready.append(req)
                except Exception as err:  # a failing request must not take the server down
                    self._fail(req, err)
            if budget is not None:
                self.busiest_prefill = max(self.busiest_prefill, self._prefill_spent)
            to_feed: list[tuple[GenRequest, int]] = []
            t1 = time.perf_counter()
            sampled = self._sample(ready)
            t2 = time.perf_counter()
            for req, tok in sampled:
                try:
                    fed = self._advance(req, tok)
                    if fed is not None:
                        to_feed.append((req, fed))
                except Exception as err:
                    self._fail(req, err)
            t3 = time.perf_counter()
            self._feed(to_feed)
            self.metrics.iteration({"prefill": t1 - t0, "sample": t2 - t1, "advance": t3 - t2,
                                    "step": time.perf_counter() - t3})
        with self._cv:
            left = list(self.active) + [r for q in self.waiting.values() for r in q]
            self.waiting.clear()
            self.n_waiting = 0
        for req in left:  # nobody waits forever for an answer
            req.emit({"type": "error", "message": "server shutting down"})

    def _fail(self, req: GenRequest, err: Exception) -> None:
        self.metrics.inc("request_errors_total")
        if req in self.active:
            self.active.remove(req)
        self._leave_runtime(req, export=False)
        req.cache = req.prefilling = None
        self.store.dequeue(req.id)
        if isinstance(err, RequestRejected):
            req.emit({"type": "error", "message": err.message, "status": err.status, "code": err.code,
                      "param": err.param})
        else:
            log.error("request %s failed: %s: %s", req.id, type(err).__name__, err)
            req.emit({"type": "error", "message": f"{type(err).__name__}: {err}"})

    def _feed(self, items: list[tuple[GenRequest, int]]) -> None:
        """Feed each request its sampled token: one runtime step for the requests in its slots, one batched forward
        for the full caches, one each otherwise."""
        pooled = [(r, t) for r, t in items if r.slot is not None]
        chunk_req = self._next_chunk()
        if chunk_req is not None:
            self._together(lambda its: self._step_mixed(its, chunk_req), pooled, also=chunk_req)
        elif pooled:
            self._together(self._step_runtime, pooled)
        if pooled:
            items = [(r, t) for r, t in items if r.slot is None]
        batch = [(r, t) for r, t in items if _batchable(r.cache)] if self.config.batch_decode else []
        if len(batch) < 2:
            batch = []
        if batch:
            self._together(self._forward_batch, batch)
        in_batch = {id(r) for r, _ in batch}
        for req, tok in items:
            if id(req) not in in_batch:
                try:
                    self._forward(req, [tok])
                except Exception as err:
                    self._fail(req, err)

    def _forward_batch(self, items: list[tuple[GenRequest, int]]) -> None:
        """One decode step for several full caches of different lengths: left-pad their KV into one batch, mask the
        padding, give each row its true position, then append each row's new KV to its own cache."""
        lens = [r.cache.get_seq_length() for r, _ in items]
        longest = max(lens)
        batched = DynamicCache(config=self.model.config)
        for i, layer in enumerate(batched.layers):
            # [1, H, n_b, D] each -> [B, H, longest, D]
            ks = [F.pad(r.cache.layers[i].keys, (0, 0, longest - n, 0)) for (r, _), n in zip(items, lens)]
            vs = [F.pad(r.cache.layers[i].values, (0, 0, longest - n, 0)) for (r, _), n in zip(items, lens)]
            layer.lazy_initialization(ks[0], vs[0])
            layer.keys, layer.values = torch.cat(ks), torch.cat(vs)
        mask = torch.zeros((len(items), longest + 1), dtype=torch.long, device=self.device)  # [B, longest + 1]
        for b, n in enumerate(lens):
            mask[b, longest - n:] = 1
        ids = torch.tensor([[t] for _, t in items], device=self.device)  # [B, 1]
        pos = torch.tensor([[n] for n in lens], device=self.device)  # [B, 1]: each row's true position
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **cache_kwargs(self.model, batched))
        for b, (req, tok) in enumerate(items):
            for i, layer in enumerate(req.cache.layers):
                new = batched.layers[i]
                layer.keys = torch.cat([layer.keys, new.keys[b:b + 1, :, -1:]], dim=-2)
                layer.values = torch.cat([layer.values, new.values[b:b + 1, :, -1:]], dim=-2)
            req.logits = out.logits[b, -1].float()
            req.fed.append(tok)
        self.metrics.inc("batched_decode_steps")
        self.metrics.inc("batched_decode_rows", len(items))

    def _together(self, step: Callable[[list[tuple[GenRequest, int]]], None],
                  items: list[tuple[GenRequest, int]], also: GenRequest | None = None) -> None:
        """Run one batched ``step`` for ``items`` (and the prefilling request ``also``); should it fail, every request
        in it fails (the server goes on)."""
        try:
            step(items)
        except Exception as err:
            for req in [r for r, _ in items] + ([also] if also is not None else []):
                self._fail(req, err)

    def _next_chunk(self) -> GenRequest | None:
        """The request prefilling in the pool whose chunk goes into this iteration's step: the fewest prompt tokens
        left first (a turn reusing its history from the store starts before long recomputations), unless a request
        has waited :data:`STARVE_STEPS` steps for a chunk, then the longest-waiting first."""
        waiting = [r for r in self.active if r.prefilling is _IN_POOL and not r.cancelled.is_set()]
        if not waiting:
            return None
        for r in waiting:
            r.chunk_wait += 1
        starving = [r for r in waiting if r.chunk_wait > STARVE_STEPS]
        if starving:
            return max(starving, key=lambda r: r.chunk_wait)
        return min(waiting, key=lambda r: (len(r.prefill_tokens), r.t_submit))

    def _step_mixed(self, items: list[tuple[GenRequest, int]], req: GenRequest) -> None:
        """One runtime step of the decoding requests in its slots and the next prompt chunk of ``req``."""
        chunk = self.runtime.prefill_chunk
        take, rest = req.prefill_tokens[:chunk], req.prefill_tokens[chunk:]
        ids = torch.tensor([t for _, t in items], dtype=torch.long, device=self.device)  # [n]
        logits, last = self.runtime.step_chunk([r.slot for r, _ in items], ids, req.slot,
                                               torch.tensor(take, dtype=torch.long, device=self.device))
        logits = logits.float()  # [n, vocab]
        for b, (r, tok) in enumerate(items):
            r.logits = logits[b]
            r.fed.append(tok)
        req.fed.extend(take)
        req.prefill_tokens = rest
        req.chunk_wait = 0
        if not rest:
            req.prefilling = None
            req.logits = last.float()  # [vocab]
        self.metrics.inc("prefill_chunks_total")
        self.metrics.inc("runtime_mixed_steps")
        if items:
            self.metrics.inc("runtime_decode_steps")
            self.metrics.inc("runtime_decode_rows", len(items))

    def _step_runtime(self, items: list[tuple[GenRequest, int]]) -> None:
        """One batched decode step of the runtime for the requests in its slots."""
        ids = torch.tensor([t for _, t in items], device=self.device)  # [n]
        logits = self.runtime.step([r.slot for r, _ in items], ids).float()  # [n, vocab]
        for b, (req, tok) in enumerate(items):
            req.logits = logits[b]
            req.fed.append(tok)
        self.metrics.inc("runtime_decode_steps")
        self.metrics.inc("runtime_decode_rows", len(items))

    def _join_runtime(self, req: GenRequest) -> None:
        """Move a freshly prefilled request into a slot of the decode runtime when it can hold it (else it keeps
        its own cache and decodes on its own); the runtime is built at the first request that can join. Once per
        request: a second join would take another slot for its emptied cache."""
        if req.join_tried:
            raise RuntimeError(f"request {req.id} was already offered to the decode runtime")
        req.join_tried = True
        if self.runtime_off is not None:
            return
        from ..cache import SqueezeCache, SqueezeLayer
        from ..channel.kivi import KIVILayer

        cache = req.cache
        cap = self.config.runtime_slot_tokens
        kivi = isinstance(cache, SqueezeCache) and all(isinstance(x, KIVILayer) for x in cache.layers)
        if isinstance(cache, SqueezeCache) and all(type(x) is SqueezeLayer for x in cache.layers):
            policy, chunk = cache.policy, cache.evict_every
            need = [b + chunk if b is not None else x.physical_length + req.max_tokens
                    for b, x in ((x.decode_budget(), x) for x in cache.layers)]
        elif kivi and all(x.decode_budget() is None for x in cache.layers):
            # KIVI (policies that evict nothing while decoding): quantised slots of runtime_slot_tokens positions
            policy, chunk = cache.policy, cache.evict_every
            need = [x.physical_length + req.max_tokens for x in cache.layers]
            cap = cap // cache.layers[0].group_size * cache.layers[0].group_size
        elif self.config.cache is None and _batchable(cache):  # the full cache: a pool that never evicts
            policy, chunk = "none", 1
            need = [x.keys.shape[2] + req.max_tokens for x in cache.layers]
        else:
            self.runtime_off = f"the cache's layers are not plain squeezekv layers ({type(cache.layers[0]).__name__})"
            log.info("requests decode one by one: %s", self.runtime_off)
            return
        if self.runtime is None and not self._build_runtime(cache.layers[0].values, len(cache.layers), policy, chunk,
                                                            cache.layers[0] if kivi else None):
            return
        if max(need) > cap or self.runtime.pool.free_slots() == 0:
            self.metrics.inc("runtime_fallback_total")
            return
        try:
            req.slot = self.runtime.join(cache)
        except ValueError as err:  # e.g. a restored cache of another policy: it decodes on its own, correctly
            log.info("request %s decodes on its own: %s", req.id, err)
            self.metrics.inc("runtime_fallback_total")
            return
        _drop_kv(cache)  # the slot holds it now; KVPool.export writes it back when the request finishes

    def _build_runtime(self, keys: torch.Tensor, layers: int, policy: Any, chunk: int, kivi: Any = None) -> bool:
        """Build the decode runtime for caches of ``layers`` layers whose KV looks like ``keys`` ``[1, H, n, D]`` (a
        KIVI layer ``kivi``'s residual: a quantised pool of its bits, group and residual); False (and
        ``runtime_off`` set) where it cannot be built. The full cache's runtime (policy ``none``) with
        ``prefill_chunk`` also prefills new prompts in its slots, a chunk inside each decode step."""
        from ..runtime.kivi_pool import KiviPool
        from ..runtime.pool import KVPool
        from ..runtime.runtime import DecodeRuntime

        h, d, dt = keys.shape[1], keys.shape[-1], keys.dtype
        cap = self.config.runtime_slot_tokens
        if kivi is not None:
            cap = cap // kivi.group_size * kivi.group_size
        scored = policy != "none" and policy.uses_scores and kivi is None
        caps = [cap] * layers
        kivi_args = dict(bits=kivi.bits, group_size=kivi.group_size, residual=kivi.residual) if kivi else {}
        if self.config.runtime_slots != "auto":
            slots = int(self.config.runtime_slots)
        else:
            per = (KiviPool.bytes_per_kivi_slot(caps, h, d, dt, **kivi_args) if kivi
                   else KVPool.bytes_per_slot(caps, h, d, dt, scored))
            slots = self._slots_in_memory(per, keys.device)
            if slots < 1:
                self.runtime_off = (f"runtime_slots='auto': the free memory of {keys.device} less "
                                    f"runtime_reserve_gib={self.config.runtime_reserve_gib} holds no slot")
                log.warning("requests decode one by one: %s", self.runtime_off)
                return False
        try:
            if kivi is not None and cap < kivi.group_size:
                raise ValueError(f"runtime_slot_tokens={self.config.runtime_slot_tokens} holds no KIVI group "
                                 f"of {kivi.group_size}")
            pool = (KiviPool(caps, slots, h, d, dtype=dt, device=keys.device, **kivi_args) if kivi
                    else KVPool(caps, slots, h, d, dtype=dt, device=keys.device, with_scores=scored))
            self.runtime = DecodeRuntime(self.model, pool, policy, chunk, compile=self.config.runtime_compile,
                                         prefill_chunk=self._mixed_chunk())
        except ValueError as err:  # a model or policy the runtime does not support
            self.runtime_off = str(err)
            log.info("requests decode one by one: %s", err)
            return False
        if self.runtime.use_graph and self.config.runtime_warmup:
            t0 = time.perf_counter()
            sizes = self.runtime.warm(pool.max_seqs)  # every bucket captured now, not while requests decode
            log.info("decode runtime: %d slots, graphs of buckets %s captured in %.1f s", pool.max_seqs, sizes,
                     time.perf_counter() - t0)
        return True

    def _mixed_chunk(self) -> int | None:
        """The prompt tokens a mixed step feeds (the full cache's ``prefill_chunk`` with the runtime on), else None."""
        if self.config.cache is None and self.config.runtime_slots and self.config.prefill_chunk is not None:
            return self.config.prefill_chunk
        return None

    def _kv_shape(self) -> tuple[int, int]:
        """(KV heads, head dim) of the model's attention layers."""
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = cfg.num_key_value_heads or cfg.num_attention_heads
        return heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def _open_slot(self, req: GenRequest, prompt: list[int], snap: Any) -> bool:
        """Prefill ``req`` (the full cache) in a slot of the runtime, a chunk inside each decode step: the slot is
        opened empty or with the reused prefix ``snap`` (a store snapshot, copied into it), the rest of ``prompt`` is
        left in ``req.prefill_tokens`` for :meth:`_feed`. False where it cannot be (no mixed steps, the runtime off
        or full, a prompt and answer over the slot's tokens): the request then prefills on its own."""
        if self._mixed_chunk() is None or self.runtime_off is not None:
            return False
        reused = len(snap.tokens) if snap is not None else 0
        if len(prompt) + req.max_tokens > self.config.runtime_slot_tokens or reused >= len(prompt):
            return False  # (it prefills on its own; _join_runtime counts the fallback)
        h, d = self._kv_shape()
        dtype = next(self.model.parameters()).dtype
        empty = torch.empty((1, h, 0, d), dtype=dtype, device=self.device)  # [1, H, 0, D]
        if self.runtime is None and not self._build_runtime(empty, int(self.model.config.num_hidden_layers), "none", 1):
            return False
        if self.runtime.prefill_chunk is None or self.runtime.pool.free_slots() == 0:
            return False
        prefix = None
        if snap is not None:
            from ..store.snapshot import restore

            prefix = restore(snap, self.model, self.device, clone=False)  # copied into the slot, never changed
        req.slot = self.runtime.open(prefix)
        req.join_tried = True
        cache = DynamicCache(config=self.model.config)
        for layer in cache.layers:  # empty until the slot is exported into it (for the store)
            layer.lazy_initialization(empty, empty)
            layer.keys, layer.values = empty, empty
        req.cache = cache
        req.fed = list(snap.tokens) if snap is not None else []
        if snap is not None:
            req.cached_tokens = len(snap.tokens)
            req.reused_tokens = tuple(snap.tokens)
        req.prefill_tokens = list(prompt[len(req.fed):])
        req.prefilling = _IN_POOL
        return True

    def _slots_in_memory(self, slot_bytes: int, device: torch.device) -> int:
        """How many slots of ``slot_bytes`` the device's free memory holds, less ``runtime_reserve_gib`` (for
        activations, CUDA graphs and requests outside the pool): admission by bytes."""
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:  # the host's available physical memory
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        spare = free - int(self.config.runtime_reserve_gib * (1 << 30))
        slots = max(0, spare // slot_bytes - 1)  # (the pool's scratch row is one more slot)
        log.info("runtime_slots='auto': %d slots of %.1f MiB in %.1f GiB free", slots, slot_bytes / 2**20,
                 free / 2**30)
        return int(slots)

    def _leave_runtime(self, req: GenRequest, export: bool) -> None:
        """Release the request's slot; with ``export``, its KV goes back into ``req.cache`` first (for the store)."""
        if req.slot is None:
            return
        slot, req.slot = req.slot, None
        try:
            if export and req.cache is not None:
                self.runtime.pool.export(slot, req.cache)
        finally:
            self.runtime.leave(slot)

    def _forward(self, req: GenRequest, tokens: list[int]) -> None:
        ids = torch.tensor([tokens], device=self.device)  # [1, n]
        spec = self.config.cache
        chunk = self.config.prefill_chunk if spec is None else spec.prefill_chunk
        if chunk is not None and len(tokens) > 1 and (not req.fed or spec is None):
            # one chunk per engine iteration, so the running requests decode between the chunks (the full cache
            # also for the new tokens after a reused prefix; a compressed cache's chunked prefill starts fresh)
            if spec is not None:
                from ..prefill import chunked_prefill_steps  # the spec's chunked prefill of a fresh prompt

                steps = chunked_prefill_steps(self.model, ids, req.cache, chunk)
            else:
                steps = self._full_prefill_steps(ids, req.cache, chunk)
            req.prefilling = self._counted(steps, len(tokens), chunk)
            req.prefill_tokens = tokens
            self._prefill_step(req)
            return
        self._prefill_spent += len(tokens)
        out = self.model(input_ids=ids, use_cache=True, **cache_kwargs(self.model, req.cache))
        req.logits = out.logits[0, -1].float()  # [vocab]
        req.fed.extend(tokens)

    def _full_prefill_steps(self, ids: torch.Tensor, cache: Any, chunk: int) -> Any:
        """The full cache's prompt ``ids`` ``[1, n]`` ``chunk`` tokens at a time: yields None after each chunk but the
        last, then the last position's logits ``[1, vocab]`` (as ``prefill.chunked_prefill_steps``)."""
        n = ids.shape[1]
        for start in range(0, n, chunk):
            out = self.model(input_ids=ids[:, start:start + chunk], use_cache=True, logits_to_keep=1,
                             **cache_kwargs(self.model, cache))
            yield out.logits[:, -1] if start + chunk >= n else None

    def _counted(self, steps: Any, n: int, chunk: int) -> Any:
        """``steps`` (one chunk of an ``n``-token prompt per item) counting each chunk's tokens into the iteration's
        prefill tokens."""
        fed = 0
        for item in steps:
            take = max(1, min(chunk, n - fed))
            fed += take
            self._prefill_spent += take
            yield item

    def _prefill_step(self, req: GenRequest) -> None:
        """Run the next chunk of the request's chunked prefill; after the last, its logits are set and it is done."""
        logits = next(req.prefilling)
        self.metrics.inc("prefill_chunks_total")
        if logits is None:
            return
        req.prefilling = None
        req.logits = logits[0].float()  # [vocab]
        req.fed.extend(req.prefill_tokens)
        req.prefill_tokens = []
        self._join_runtime(req)

    def _prefill(self, req: GenRequest) -> None:
        self.store.dequeue(req.id)
        prompt = req.prompt
        limit = self.context - req.max_tokens
        snap = None
        if len(prompt) > limit:  # only with truncation="rerotate" (the server rejects it otherwise)
            drop = len(prompt) - limit
            full = self._stored(prompt, req.scope)
            if full is not None and full.croppable and len(full.tokens) > drop:
                snap = shift_positions(full, self.model, drop)
            prompt = prompt[drop:]
            req.truncated = drop
        elif req.prefilled is None:
            snap = self._stored(prompt, req.scope)
        req.detok = StreamText(self.tokenizer, req.stop)
        if req.prefilled is not None:  # the history's KV placed directly: only the last prompt token is fed
            req.cache = req.prefilled()
            req.prefilled = None
            req.fed = list(prompt[:-1])
            self._forward(req, prompt[-1:])
        elif not req.truncated and self._open_slot(req, prompt, snap):
            pass  # its chunks go into the decode steps (_feed)
        elif snap is not None:
            with LayerwiseLoad(snap, self.model, self.device) as cache:
                req.cache = cache
                req.fed = list(snap.tokens)
                req.cached_tokens = len(snap.tokens)
                req.reused_tokens = tuple(snap.tokens)
                self._forward(req, prompt[len(snap.tokens):])
        else:
            try:
                req.cache = self._make_cache()
                self._forward(req, prompt)
            except ValueError as err:
                if self.config.cache is None:
                    raise
                # the compressed cache cannot be built for this prompt (e.g. a budget below the policy's minimum)
                raise RequestRejected(
                    f"this server's cache ({self.config.cache.to_text()}) cannot run "
                    f"this prompt of {len(prompt)} tokens: {err}", 400, "prompt_unsupported_by_cache",
                    "prompt") from None
        if req.prefilling is None and not req.join_tried:
            self._join_runtime(req)  # (a chunked prefill joins after its last chunk, which may be its first)
        self.reuse_log.append((req.id, tuple(req.prompt), req.reused_tokens))
        if req.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(int(req.seed))

    def _stored(self, prompt: list[int], scope: str | None) -> Any:
        """The store's snapshot for ``prompt`` in ``scope``, or None; a failing store is a miss (logged)."""
        try:
            return self.store.get(prompt, scope=scope)
        except Exception as err:
            log.warning("KV store lookup failed: %s: %s", type(err).__name__, err)
            self.metrics.inc("store_errors_total")
            return None

    def _sample(self, reqs: list[GenRequest]) -> list[tuple[GenRequest, int]]:
        """The next token of every request of the iteration in one batched sampling (each request's temperature,
        top_p and seed; :func:`~squeezekv.serve.sampling.sample_rows`) and one copy to the host. Should it fail,
        every request in it fails."""
        if not reqs:
            return []
        try:
            logits = torch.stack([r.logits for r in reqs])  # [n, vocab] float32
            toks = sample_rows(logits, [r.temperature for r in reqs], [r.top_p for r in reqs],
                               [r.generator for r in reqs])
        except Exception as err:
            for req in reqs:
                self._fail(req, err)
            return []
        return list(zip(reqs, toks))

    def _advance(self, req: GenRequest, tok: int) -> int | None:
        """Take the sampled token, stream its text, finish if done; returns the token to feed, or None."""
        if not req.generated:
            self.metrics.ttft.observe(time.perf_counter() - req.t_submit)
        req.generated.append(tok)
        if tok in self.eos:
            self._finish(req, "stop")
            return None
        piece = req.detok.push(tok)  # incomplete characters and possible stop-string starts are held back
        if piece:
            req.emit({"type": "delta", "text": piece})
        if req.detok.stopped:
            self._finish(req, "stop")
        elif len(req.generated) >= req.max_tokens or len(req.fed) + 1 >= self.context:
            self._finish(req, "length")
        else:
            return tok
        return None

    def _finish(self, req: GenRequest, reason: str) -> None:
        self.active.remove(req)
        req.prefilling = None
        self.store.dequeue(req.id)
        pooled = req.slot is not None
        exported = reason != "cancelled" and self.reuse_off is None
        self._leave_runtime(req, export=exported)
        # (a pooled request's own cache was emptied when it joined: only an exported slot refills it)
        if req.cache is not None and req.fed and self.reuse_off is None and (exported or not pooled):
            # the KV of everything fed (prompt + all generated tokens but the last): saved in the background
            try:
                self.store.save_async(capture(req.cache, req.fed), scope=req.scope)
            except TypeError as err:  # a layer type the store cannot restore exactly: no reuse for this cache
                self.reuse_off = str(err)
                log.warning("multi-turn KV reuse is off for this server's cache: %s", err)
            except Exception as err:
                log.warning("KV store save failed: %s: %s", type(err).__name__, err)
                self.metrics.inc("store_errors_total")
        req.cache = None
        if reason == "cancelled":
            self.metrics.inc("cancelled_requests_total")
        elif req.detok is not None:
            rest = req.detok.finish()  # what was held back (no stop string can follow any more)
            if rest:
                req.emit({"type": "delta", "text": rest})
        self.metrics.inc("requests_total")
        self.metrics.inc("prompt_tokens_total", len(req.prompt))
        self.metrics.inc("cached_prompt_tokens_total", req.cached_tokens)
        self.metrics.inc("generated_tokens_total", len(req.generated))
        req.emit({"type": "done", "finish_reason": reason, "usage": {
            "prompt_tokens": len(req.prompt), "completion_tokens": len(req.generated),
            "total_tokens": len(req.prompt) + len(req.generated), "cached_tokens": req.cached_tokens,
            "truncated_tokens": req.truncated}})


__all__ = ["Engine", "EngineConfig", "GenRequest", "QueueFull", "RequestRejected", "MIN_TEMPERATURE"]
