"""Batched sampling of the serving engine (:func:`squeezekv.serve.sampling.sample_rows`): greedy rows are their
argmax, sampled rows follow softmax(logits / T) within top-p, a seeded row does not depend on the other rows."""

from __future__ import annotations

import pytest
import torch

from squeezekv.serve.sampling import MIN_TEMPERATURE, sample_rows


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_rows_are_their_argmax_and_a_tiny_top_p_is_greedy():
    logits = torch.randn(5, 50, generator=_gen(0))
    want = logits.argmax(-1).tolist()
    assert sample_rows(logits, [0.0] * 5, [1.0] * 5, [None] * 5) == want
    assert sample_rows(logits, [MIN_TEMPERATURE / 2] * 5, [1.0] * 5, [None] * 5) == want
    # top_p below the largest probability keeps the top token only, whatever the draw
    assert sample_rows(logits, [1.0] * 5, [1e-6] * 5, [_gen(i) for i in range(5)]) == want


def test_a_seeded_row_does_not_depend_on_the_batch():
    logits = torch.randn(4, 200, generator=_gen(1))
    alone = [sample_rows(logits[i:i + 1], [0.9], [0.95], [_gen(7)])[0] for i in range(4)]
    together = sample_rows(logits, [0.9] * 4, [0.95] * 4, [_gen(7) for _ in range(4)])
    assert together == alone
    mixed = sample_rows(logits, [0.0, 0.9, 0.0, 0.9], [1.0, 0.95, 1.0, 0.95], [None, _gen(7), None, _gen(7)])
    assert mixed[1::2] == alone[1::2] and mixed[0::2] == logits[0::2].argmax(-1).tolist()


def test_sampled_frequencies_follow_the_tempered_softmax_within_top_p():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    t, n = 0.7, 20000
    p = torch.softmax(logits / t, -1)
    toks = sample_rows(logits.expand(n, -1), [t] * n, [1.0] * n, [None] * n)
    freq = torch.bincount(torch.tensor(toks), minlength=6).float() / n
    assert (freq - p).abs().max() < 0.015, (freq, p)
    # top_p = 0.8: the smallest prefix (by probability) with mass >= 0.8, renormalised; nothing outside it
    cum = p.cumsum(0)
    k = int((cum - p < 0.8).sum())
    toks = sample_rows(logits.expand(n, -1), [t] * n, [0.8] * n, [None] * n)
    freq = torch.bincount(torch.tensor(toks), minlength=6).float() / n
    assert freq[k:].sum() == 0
    assert (freq[:k] - p[:k] / p[:k].sum()).abs().max() < 0.015


def test_bad_lengths_are_named():
    with pytest.raises(ValueError, match="2 rows of logits but 1 temperatures"):
        sample_rows(torch.zeros(2, 3), [1.0], [1.0, 1.0], [None, None])
