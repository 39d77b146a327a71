"""Sampling the next token of many requests at once, each with its own temperature, top-p and seed.

One call for every request of an engine iteration: the rows' logits are stacked ``[n, vocab]``, greedy rows
(temperature below :data:`MIN_TEMPERATURE`) take their argmax, sampled rows their softmax at their temperature, cut
to the smallest set of tokens whose mass reaches their top-p (nucleus sampling, Holtzman et al. 2020,
arXiv 1904.09751), and draw one token by the exponential race: ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)`` i.i.d.
picks token ``v`` with probability ``p_v`` (the Gumbel-max trick in another form). A request with a seed draws its
``E`` from its own generator, so its tokens depend on its seed and logits only, not on which requests share the
batch; the others share one draw. Everything stays on the logits' device; the tokens come back in one copy.
"""

from __future__ import annotations

from typing import Sequence

import torch

#: temperatures below this sample greedily (dividing logits by less overflows to inf and NaN probabilities)
MIN_TEMPERATURE = 1e-4


def sample_rows(logits: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of each row of ``logits`` ``[n, vocab]``: greedy where ``temperatures[i] <``
    :data:`MIN_TEMPERATURE`, else sampled at that temperature within top-p ``top_ps[i]`` (in ``(0, 1]``), with
    ``generators[i]`` (on the logits' device) or the default generator when None."""
    n, vocab = logits.shape
    if not (len(temperatures) == len(top_ps) == len(generators) == n):
        raise ValueError(f"{n} rows of logits but {len(temperatures)} temperatures, {len(top_ps)} top_p values and "
                         f"{len(generators)} generators")
    tokens = logits.argmax(-1)  # [n]
    sampled = [i for i, t in enumerate(temperatures) if t >= MIN_TEMPERATURE]
    if sampled:
        dev = logits.device
        rows = torch.tensor(sampled, device=dev)  # [m]
        temp = torch.tensor([float(temperatures[i]) for i in sampled], device=dev, dtype=torch.float32)  # [m]
        probs = torch.softmax(logits.index_select(0, rows).float() / temp[:, None], dim=-1)  # [m, vocab]
        top_p = [float(top_ps[i]) for i in sampled]
        if any(p < 1.0 for p in top_p):
            sorted_p, order = probs.sort(dim=-1, descending=True)  # [m, vocab]
            cut = torch.tensor(top_p, device=dev, dtype=torch.float32)[:, None]  # [m, 1]
            keep = sorted_p.cumsum(-1) - sorted_p < cut  # the smallest prefix with mass >= top_p
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
        race = torch.empty_like(probs)  # [m, vocab] ~ Exp(1)
        shared = [j for j, i in enumerate(sampled) if generators[i] is None]
        if shared:
            race[shared] = torch.empty((len(shared), vocab), device=dev).exponential_()
        for j, i in enumerate(sampled):
            g = generators[i]
            if g is not None:
                race[j].exponential_(generator=g)
        race.clamp_(min=torch.finfo(torch.float32).tiny)  # a draw of exactly 0 would make 0 / 0 (NaN wins argmax)
        tokens = tokens.index_copy(0, rows, (probs / race).argmax(-1))
    return tokens.tolist()


__all__ = ["MIN_TEMPERATURE", "sample_rows"]
