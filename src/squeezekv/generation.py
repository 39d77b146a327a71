"""The generation loops every part of squeezekv shares: prefill, greedy decoding, log-likelihood of a continuation.

* :func:`cache_kwargs`: the keyword that hands a cache to the model's forward (``cache=`` where the installed
  transformers takes it, else ``past_key_values=``).
* :func:`prefill`: the prompt through the model into a cache (in one pass, or in chunks compressing after each:
  :func:`squeezekv.chunked_prefill`); the last position's logits.
* :func:`greedy`: greedy decoding, one token per step, from the logits the prefill returned.
* :func:`stepwise_logprobs`: a continuation teacher-forced one token per step (each step is a decoding step of the
  cache, so a policy that keeps evicting while decoding does so), log-probabilities of its tokens.
* :func:`continuation_logprobs`: the same continuation in one forward pass after the prefill (the prefix is
  compressed once; the continuation attends to the kept prefix tokens and to itself causally).

``squeezekv run`` (:mod:`squeezekv.runner`) and the evaluation grid (:mod:`squeezekv.eval.grid`) decode and score
with these loops; the serving engine (iteration-level scheduling, sampling), CUDA-graph decoding
(:mod:`squeezekv.graphs`, fixed-shape steps) and the calibrations hand their caches over with :func:`cache_kwargs`.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{"cache": c}`` for transformers versions whose forward takes ``cache``, else ``{"past_key_values": c}``."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def _check_chunk(chunk: int | None) -> None:
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk={chunk!r} is out of range: must be an integer >= 1 (or None: one-pass prefill)")


@torch.no_grad()
def prefill(model: Any, prompt: Sequence[int], cache: Any, device: str | torch.device,
            chunk: int | None = None) -> torch.Tensor:
    """Run ``prompt`` (token ids of one sequence) through ``model`` into ``cache``; the last position's logits
    ``[1, vocab]``. ``chunk``: prefill in chunks of this many tokens, compressing after each
    (:func:`squeezekv.chunked_prefill`, a :class:`squeezekv.SqueezeCache` only); None: one pass."""
    _check_chunk(chunk)
    ids = torch.tensor([list(prompt)], device=device)  # [1, prompt]
    if chunk is not None:
        from .prefill import chunked_prefill

        return chunked_prefill(model, ids, cache, chunk)  # [1, vocab]
    return model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]  # [1, vocab]


def _step(model: Any, token: int, cache: Any, device: str | torch.device) -> torch.Tensor:
    """One decoding step: ``token`` in, the next token's logits ``[1, vocab]`` out."""
    ids = torch.tensor([[token]], device=device)  # [1, 1]
    return model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]  # [1, vocab]


@torch.no_grad()
def greedy(model: Any, cache: Any, logits: torch.Tensor, max_new_tokens: int, eos: set[int] | frozenset[int],
           device: str | torch.device, keep_eos: bool = False) -> list[int]:
    """Greedy decoding on ``cache`` from ``logits`` ``[1, vocab]`` (the prefill's): at most ``max_new_tokens``
    tokens, stopping at the first token in ``eos`` (included in the result when ``keep_eos``)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is out of range: must be an integer >= 0")
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits.argmax(-1))
        if nxt in eos:
            if keep_eos:
                out.append(nxt)
            break
        out.append(nxt)
        logits = _step(model, nxt, cache, device)  # [1, vocab]
    return out


@torch.no_grad()
def stepwise_logprobs(model: Any, cache: Any, logits: torch.Tensor, continuation: Sequence[int],
                      device: str | torch.device) -> list[float]:
    """Log-probability of each token of ``continuation`` after the prompt whose last logits are ``logits``
    ``[1, vocab]``, teacher-forced one token per decoding step on ``cache`` (the last token is not fed)."""
    if not continuation:
        raise ValueError("continuation is empty: give at least one token to score")
    out: list[float] = []
    step = logits
    for i, tok in enumerate(continuation):
        out.append(float(torch.log_softmax(step.float(), dim=-1)[0, tok]))
        if i + 1 < len(continuation):
            step = _step(model, tok, cache, device)  # [1, vocab]
    return out


@torch.no_grad()
def continuation_logprobs(model: Any, cache: Any, logits: torch.Tensor, continuation: Sequence[int],
                          device: str | torch.device) -> torch.Tensor:
    """Log-probabilities ``[len(continuation)]`` (float32) of ``continuation`` after the prompt whose last logits are
    ``logits`` ``[1, vocab]``: all but its last token go through ``cache`` in one forward pass."""
    if not continuation:
        raise ValueError("continuation is empty: give at least one token to score")
    all_logits = logits[:, None]  # [1, 1, vocab]
    if len(continuation) > 1:
        rest = model(input_ids=torch.tensor([list(continuation[:-1])], device=device), use_cache=True,
                     **cache_kwargs(model, cache)).logits  # [1, len - 1, vocab]
        all_logits = torch.cat([all_logits, rest], dim=1)  # [1, len, vocab]
    logp = torch.log_softmax(all_logits.float(), dim=-1)[0]  # [len, vocab]
    target = torch.tensor(list(continuation), device=logp.device)  # [len]
    return logp.gather(1, target[:, None]).squeeze(1)  # [len]
