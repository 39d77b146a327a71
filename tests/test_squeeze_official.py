"""squeezekv's SqueezeAttention plan against the official implementation's budget computation.

Official: hetailang/SqueezeAttention, ``utils_hh/modify_llama_drop.py`` (``LlamaModel.forward`` after the prefill):
per layer, the mean over the prompt's tokens of cos(hidden before the attention block, hidden after the attention
output is added); 3-cluster k-means over those scalars; the cluster of highest centre ("class 3") gets
``int(KV_class3 * prompt_len)`` tokens, every other layer ``int(a * prompt_len)`` with
``a = (L * ini_size - n3 * KV_class3) / (L - n3)``; a window longer than the prompt keeps the whole prompt.

squeezekv's ``p`` is the shrunk share relative to the base budget: ``p = KV_class3 / ini_size``. The expected plans
below are computed by hand from that formula (comments show the arithmetic). The measurement itself (cosine of the
residual stream before and after the attention output is added, mean over the prompt) is checked against a direct
computation in ``tests/test_allocation.py::test_squeeze_importance_is_cosine_similarity``."""

from __future__ import annotations

import pytest

from squeezekv.allocation import SqueezeAllocation

# ten layers, three clear groups of similarity; class 3 (highest similarity, least important) = layers 5, 6, 8, 9
SIMS = [0.62, 0.40, 0.41, 0.63, 0.61, 0.93, 0.95, 0.39, 0.94, 0.96]
CLASS3 = [5, 6, 8, 9]


def test_plan_matches_official_formula_on_given_similarities():
    # prompt of 1000 tokens, ini_size 0.2 -> base 200 tokens; KV_class3 0.08 -> p = 0.08 / 0.2 = 0.4
    budgets, details = SqueezeAllocation(p=0.4).allocate(200, 10, SIMS)
    assert details["shrunk_layers"] == CLASS3
    # clusters by increasing centre: {1, 2, 7} (0.40), {0, 3, 4} (0.62), {5, 6, 8, 9} (0.945)
    assert details["cluster_of_layer"] == [1, 0, 0, 1, 1, 2, 2, 0, 2, 2]
    assert details["cluster_centers"] == pytest.approx([0.40, 0.62, 0.945], abs=1e-9)
    # official: class 3 -> int(0.08 * 1000) = 80; a = (10 * 0.2 - 4 * 0.08) / 6 = 0.28 -> 280 tokens each
    # (the official int(a * prompt_len) gives 279 because 0.28 * 1000 is 279.99999999999994 in floating point;
    # squeezekv computes in integers, 2000 - 4 * 80 = 1680 = 6 * 280, so the total stays exactly 10 * 200)
    expected = [280, 280, 280, 280, 280, 80, 80, 280, 80, 80]
    assert budgets == expected
    assert sum(budgets) == 2000


def test_official_readme_setting_is_the_default_p():
    # README: --ini_size 0.21 --KV_class3 0.08 is the setting that "can significantly improve score"
    assert SqueezeAllocation().p == pytest.approx(0.08 / 0.21, abs=0.01)
    # base 210 (0.21 of 1000): class 3 gets int(0.38 * 210) = 79 (official: int(0.08 * 1000) = 80); the 6 others
    # share 2100 - 4 * 79 = 1784 = 6 * 297 + 2 -> 298 for the two lowest-similarity layers (7: 0.39, 1: 0.40)
    budgets, _ = SqueezeAllocation().allocate(210, 10, SIMS)
    assert budgets == [297, 298, 297, 297, 297, 79, 79, 298, 79, 79]


def test_long_windows_are_capped_at_the_prompt():
    """When class 3 is most layers, the others' official window a * prompt_len exceeds the prompt: officially those
    layers keep the whole prompt and the excess is lost (the total falls below L * base). squeezekv caps them at the
    prompt too, but hands the excess to the other layers so the total equals uniform's (``cap_budgets``)."""
    from squeezekv.plan import cap_budgets

    # 30 layers, 27 in class 3, base 0.2 of a 100-token prompt = 20, p = 0.4: class 3 gets 8 tokens; the 3 others
    # get (600 - 27 * 8) / 3 = 128 > 100 -> capped at 100 (official: int(1.28 * 100) = 128, i.e. the whole prompt)
    sims = [0.3, 0.31, 0.5] + [0.9 + 0.001 * i for i in range(27)]
    budgets, details = SqueezeAllocation(p=0.4).allocate(20, 30, sims)
    assert details["shrunk_layers"] == list(range(3, 30))
    assert budgets == [128, 128, 128] + [8] * 27
    capped, moved = cap_budgets(budgets, 100)
    # official plan: [100] * 3 + [8] * 27 = 516 tokens; squeezekv moves the 84 excess tokens to the 27 others
    assert moved == 84
    assert capped[:3] == [100, 100, 100]
    assert sorted(capped[3:]) == [11] * 24 + [12] * 3  # 8 + 84 / 27 = 8 + 3 (rest 3)
    assert sum(capped) == 600
