"""squeezekv analyze-layers (squeezekv.crosslayer.analyze): the similarity measures, the span proposals, the weight
capture and the CLI wiring."""

from __future__ import annotations

import math

import pytest
import torch

from squeezekv.cli import build_parser
from squeezekv.crosslayer import analyze as an


def test_cosine_and_js_of_known_maps():
    a = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])  # [B=1, H=1, T=2, T=2]
    b = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    sim, js = an.pairwise([a, a, b])
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert js[0, 1] == pytest.approx(0.0, abs=1e-7)
    # cosine of the flattened maps: (1 + 0.5 * 0 + 0.5 * 1) / (sqrt(1.5) * sqrt(2))
    assert sim[0, 2] == pytest.approx(1.5 / math.sqrt(1.5 * 2), abs=1e-6)
    # JS per row: row 0 identical (0 bits); row 1: JS([.5,.5], [0,1]) = 1 - 0.5 * H2(0.25) ... computed by hand
    m = torch.tensor([0.25, 0.75])
    kl_p = 0.5 * math.log2(0.5 / 0.25) + 0.5 * math.log2(0.5 / 0.75)
    kl_q = 1.0 * math.log2(1.0 / 0.75)
    assert js[0, 2] == pytest.approx((0 + 0.5 * (kl_p + kl_q)) / 2, abs=1e-6)
    assert js[2, 0] == js[0, 2]
    assert float(m.sum()) == 1.0


def test_js_is_one_bit_for_disjoint_distributions():
    p = torch.tensor([1.0, 0.0])
    q = torch.tensor([0.0, 1.0])
    assert float(an._js_bits(p, q)) == pytest.approx(1.0, abs=1e-6)


SIM = [
    [1.00, 0.50, 0.40, 0.30, 0.20, 0.10],
    [0.50, 1.00, 0.95, 0.92, 0.70, 0.60],
    [0.40, 0.95, 1.00, 0.97, 0.80, 0.70],
    [0.30, 0.92, 0.97, 1.00, 0.85, 0.75],
    [0.20, 0.70, 0.80, 0.85, 1.00, 0.93],
    [0.10, 0.60, 0.70, 0.75, 0.93, 1.00],
]


def test_propose_spans_greedy():
    assert an.propose_spans(SIM, 0.9) == [[1, 3], [4, 5]]
    assert an.propose_spans(SIM, 0.94) == [[1, 2]]
    assert an.propose_spans(SIM, 0.99) == []


def test_spans_for_count():
    assert an.spans_for_count(SIM, 0) == []
    assert an.spans_for_count(SIM, 1) == [[2, 3]]  # the most similar pair
    assert an.spans_for_count(SIM, 3) == [[1, 3], [4, 5]]
    # 2: at 0.95 only [1, 2]; at 0.93 [1, 2] and [4, 5]
    assert an.spans_for_count(SIM, 2) == [[1, 2], [4, 5]]
    with pytest.raises(ValueError, match="cannot share 6 layers"):
        an.spans_for_count(SIM, 6)


class _Tok:
    """Tokenizer stand-in: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 100) for c in text]}


def test_attention_maps_and_analysis_on_a_tiny_model(make_model):
    model = make_model("llama", layers=4)
    maps = an.attention_maps(model, torch.randint(3, 100, (1, 16)))
    assert model.config._attn_implementation == "sdpa"  # restored
    assert len(maps) == 4 and maps[0].shape == (1, 4, 16, 16)
    torch.testing.assert_close(maps[2].sum(-1), torch.ones(1, 4, 16))
    assert float(maps[1].triu(1).abs().max()) == 0.0  # causal
    report = an.analyze_layers(model, _Tok(), "abcdefghij" * 10, tokens=16, samples=3, threshold=0.5, counts=(1, 2),
                               progress=False)
    sim = torch.tensor(report["similarity"])
    torch.testing.assert_close(sim.diagonal(), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(sim, sim.T)
    assert report["spans"] == an.propose_spans(report["similarity"], 0.5)
    assert sum(b - a for a, b in report["spans_by_count"]["2"]) == 2
    with pytest.raises(ValueError, match="fewer than 3 x 64"):
        an.analyze_layers(model, _Tok(), "abc" * 10, tokens=64, samples=3, progress=False)


def test_cli_has_analyze_layers():
    args = build_parser().parse_args(["analyze-layers", "--threshold", "0.8", "--tokens", "256"])
    assert args.command == "analyze-layers" and args.threshold == 0.8 and args.tokens == 256


def test_spans_for_count_trims_a_span_that_overshoots():
    flat = [[1.0 if i == j else 0.95 for j in range(4)] for i in range(4)]  # one threshold shares 3 layers at once
    assert an.spans_for_count(flat, 2) == [[0, 2]]
    assert an.spans_for_count(flat, 3) == [[0, 3]]
