"""Static-budget decoding: fixed-shape steps over pre-allocated per-layer buffers, replayed as one CUDA graph.

After the prompt is compressed, each managed layer moves its tokens into a buffer of ``budget + chunk`` slots. A
decode step writes the new token's key/value into slot ``base + k`` (k = step within the chunk, a device tensor) and
attends over all slots with a mask ``slot <= base + k``: the same shapes every step, no allocation, no host sync, so
the whole model step is captured once with ``torch.cuda.CUDAGraph`` and replayed (as gpt-fast does with
``torch.compile``; here the launch overhead, which dominates eager decoding, is what the graph removes). Every
``chunk`` steps the driver evicts outside the graph, compacting the kept tokens into the same buffers so the captured
addresses stay valid. The result is the same as the dynamic cache with ``evict_every = chunk``.

Without CUDA (or with ``use_graph=False``) the same fixed-shape steps run eagerly: that is what the CPU tests check
against the dynamic path.
"""

from __future__ import annotations

from typing import Any

import torch

from .cache import SqueezeCache, SqueezeLayer
from .generation import cache_kwargs


def check_static(cache: SqueezeCache) -> None:
    """Raise ``ValueError`` naming the first layer of ``cache`` whose class cannot be driven in static mode
    (:attr:`SqueezeLayer.supports_static` False: low-rank, quantised, merged or shared storage) and the channel /
    cross-layer method that made it. The one place the capability is checked, before any layer moves."""
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, SqueezeLayer) and not layer.supports_static:
            methods = [f"{kind} method {m.name!r}" for kind, m in
                       (("channel", cache.channel), ("cross-layer", cache.crosslayer)) if m is not None]
            raise ValueError(
                f"static (CUDA-graph) decoding is not supported by layer {i} ({type(layer).__name__}), made by the "
                f"{' and the '.join(methods) or 'cache'}: decode without GraphDecoder"
            )


class GraphDecoder:
    """Greedy-decoding driver for a prefilled :class:`SqueezeCache` (batch without padding).

    ``step(ids)`` feeds ``ids`` ``[B, 1]`` and returns next-token logits ``[B, vocab]``; ``close()`` hands the cache
    back to the dynamic mode."""

    def __init__(self, model: Any, cache: SqueezeCache, chunk: int = 16, use_graph: bool | None = None):
        if not isinstance(cache, SqueezeCache):
            raise TypeError(f"GraphDecoder needs a SqueezeCache, got {type(cache).__name__}")
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r} is out of range: must be an integer >= 1")
        layers = cache.layers
        if any(not isinstance(layer, SqueezeLayer) for layer in layers):
            raise ValueError("GraphDecoder supports caches whose every layer is managed by squeezekv")
        check_static(cache)
        if cache.plan is None or any(not layer.prefill_done for layer in layers):
            raise ValueError("prefill the prompt into the cache before decoding with GraphDecoder")
        if any(layer.valid is not None for layer in layers):
            raise ValueError("GraphDecoder supports batches without padding")
        if not cache.evicts_while_decoding:
            raise ValueError(f"GraphDecoder needs a cache that keeps evicting while decoding; policy "
                             f"{cache.policy.name!r} at budget {cache.budget} does not")
        self.model, self.cache, self.chunk = model, cache, chunk
        device = layers[0].keys.device
        self.use_graph = (device.type == "cuda") if use_graph is None else use_graph
        if self.use_graph and device.type != "cuda":
            raise ValueError("CUDA graphs need the cache on a CUDA device")
        batch = layers[0].keys.shape[0]
        self.step_t = torch.zeros(1, dtype=torch.long, device=device)
        self.seen_t = torch.tensor([layers[0].seen], dtype=torch.long, device=device)
        self.ids_t = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.k = 0
        for layer in layers:
            layer.enter_static(chunk, self.step_t, self.seen_t)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits_t: torch.Tensor | None = None
        if self.use_graph:
            self._capture()

    def _forward(self) -> torch.Tensor:
        pos = self.seen_t.view(1, 1).expand(self.ids_t.shape[0], 1)  # true position of the new token
        out = self.model(input_ids=self.ids_t, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **cache_kwargs(self.model, self.cache))
        return out.logits[:, -1]

    @torch.no_grad()
    def _capture(self) -> None:
        # Warm-up runs write into the next slot (rewritten by the first real step) and add attention to the
        # scores: keep the scores and put them back afterwards.
        saved = [None if layer.scores is None else layer.scores.clone() for layer in self.cache.layers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits_t = self._forward()
        for layer, s in zip(self.cache.layers, saved):
            if s is not None:
                layer.scores.copy_(s)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One decode step for ``ids`` ``[B, 1]``; returns the logits of the next token ``[B, vocab]``."""
        self.ids_t.copy_(ids)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits_t.clone()
        else:
            logits = self._forward()
        for layer in self.cache.layers:
            layer.seen += 1
        self.k += 1
        self.seen_t.add_(1)
        if self.k == self.chunk:
            for layer in self.cache.layers:
                layer.static_evict(self.k)
            self.k = 0
            self.step_t.zero_()
        else:
            self.step_t.add_(1)
        return logits

    def close(self) -> SqueezeCache:
        """Return the cache to the dynamic mode (holding what it holds now) and drop the graph."""
        for layer in self.cache.layers:
            layer.leave_static(self.k)
        self.graph = None
        return self.cache
