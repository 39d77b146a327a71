"""Layer-wise loading of a stored snapshot, overlapped with the forward pass.

AttentionStore (Gao et al., USENIX ATC 2024, arXiv 2403.19708, section 3.2) hides the host-to-GPU copy of a
conversation's KV behind computation: layer ``i+1``'s KV is copied while layer ``i`` computes. With a CUDA target,
:class:`LayerwiseLoad` issues every layer's copy on a side stream, records one event per layer, and a forward
pre-hook on decoder layer ``i`` makes the compute stream wait for event ``i`` only (so the first layers start before
the last ones arrived). On the CPU (or when the snapshot already lives on the target device) it restores synchronously.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from ..models import decoder_layers
from .snapshot import KVSnapshot, LayerState, restore


class LayerwiseLoad:
    """Context manager: ``with LayerwiseLoad(snapshot, model, device) as cache: model(..., cache=cache)``.

    ``overlapped`` tells whether the copy really runs on a side stream (CUDA target, snapshot elsewhere)."""

    def __init__(self, snapshot: KVSnapshot, model: Any, device: torch.device | str):
        self.snapshot = snapshot
        self.model = model
        self.device = torch.device(device)
        src = snapshot.device()
        same = src.type == self.device.type and (src.index or 0) == (self.device.index or 0)
        self.overlapped = self.device.type == "cuda" and not same
        self._handles: list[Any] = []

    def __enter__(self) -> Cache:
        if not self.overlapped:
            return restore(self.snapshot, self.model, self.device)
        side = torch.cuda.Stream(device=self.device)
        events = []
        layers = []
        with torch.cuda.stream(side):
            for state in self.snapshot.layers:
                # [1, H, n, D] per tensor; pinned host memory makes non_blocking a true asynchronous copy
                # copy=True: the cache must never share (and update in place) the stored tensors
                tensors = {k: t.to(self.device, non_blocking=True, copy=True) for k, t in state.tensors.items()}
                ev = torch.cuda.Event()
                ev.record(side)
                events.append(ev)
                layers.append(LayerState(state.kind, tensors, dict(state.meta)))
        on_device = KVSnapshot(self.snapshot.tokens, self.snapshot.cache_kind, layers, dict(self.snapshot.config))
        # the copies are the cache's own tensors already: restore without cloning (a clone on the compute stream
        # would wait for every layer's copy at once)
        cache = restore(on_device, self.model, self.device, clone=False)
        for i, layer in enumerate(decoder_layers(self.model)):
            ev = events[i]
            self._handles.append(layer.register_forward_pre_hook(
                lambda module, args, ev=ev: torch.cuda.current_stream(self.device).wait_event(ev)))
        for state in layers:  # tensors were allocated on the side stream, used on the compute one
            for t in state.tensors.values():
                t.record_stream(torch.cuda.current_stream(self.device))
        return cache

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


__all__ = ["LayerwiseLoad"]
