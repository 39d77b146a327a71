"""Chunked prefill: feed a long prompt in chunks and compress after each chunk, so the cache never holds more than
``budget + chunk`` tokens per layer and activations scale with the chunk, not the prompt.

This is what "compress as chunks arrive" costs: a token of a later chunk attends only to what the earlier chunks
*kept*, not to the whole prefix, so its keys/values (and the scores H2O/SnapKV compute) differ from a one-pass
prefill; positions-only policies (window, StreamingLLM) keep exactly the same token indices. With a budget larger than
the prompt nothing is evicted and the result equals a one-pass prefill. SqueezeAttention measures layer importance on
the first chunk (its plan is then fixed for the rest of the prompt); a fraction budget is a fraction of the whole
prompt (the cache is told its length).
"""

from __future__ import annotations

from typing import Any, Iterator, cast

import torch

from .cache import SqueezeCache


def chunked_prefill_steps(
    model: Any, input_ids: torch.Tensor, cache: SqueezeCache, chunk_size: int,
    attention_mask: torch.Tensor | None = None, **model_kwargs: Any,
) -> Iterator[torch.Tensor | None]:
    """:func:`chunked_prefill` one chunk at a time: a generator that runs the next chunk at each ``next()`` and
    yields None after every chunk but the last, then the logits of the last position ``[B, vocab]`` (a caller, e.g.
    the serving engine, runs other work between chunks). Arguments are checked at the first ``next()``."""
    if not isinstance(cache, SqueezeCache):
        raise TypeError(f"chunked_prefill needs a SqueezeCache (squeezekv.make_cache), got {type(cache).__name__}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is out of range: must be an integer >= 1")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(input_ids.shape)}")
    if cache.get_seq_length() != 0:
        raise ValueError("chunked_prefill needs an empty cache (it is the prompt's prefill)")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    total = input_ids.shape[1]
    cache.prompt_length_hint = total
    for start in range(0, total, chunk_size):
        end = min(total, start + chunk_size)
        kwargs = dict(model_kwargs)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, :end]
        with torch.no_grad():
            logits = model(input_ids=input_ids[:, start:end], cache=cache, use_cache=True, logits_to_keep=1,
                           **kwargs).logits[:, -1]
        yield logits if end == total else None


@torch.no_grad()
def chunked_prefill(
    model: Any, input_ids: torch.Tensor, cache: SqueezeCache, chunk_size: int,
    attention_mask: torch.Tensor | None = None, **model_kwargs: Any,
) -> torch.Tensor:
    """Prefill ``input_ids`` ``[B, T]`` into ``cache`` ``chunk_size`` tokens at a time; returns the logits of the last
    position ``[B, vocab]``. ``attention_mask`` ``[B, T]`` (left padding) is sliced per chunk. Continue decoding with
    the same cache (pass the full-length mask plus the new tokens, as usual)."""
    *_, logits = chunked_prefill_steps(model, input_ids, cache, chunk_size, attention_mask, **model_kwargs)
    return cast(torch.Tensor, logits)  # the last chunk's (a prompt holds at least one token: checked)
