"""Layer-dimension allocations: SqueezeAttention (hand-computed plans, constant totals, measured importance), exact
1-D k-means, pyramid, uniform, and BudgetPlan / Budget validation."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

import squeezekv
from squeezekv import Budget, BudgetPlan
from squeezekv.allocation import PyramidAllocation, SqueezeAllocation, UniformAllocation, kmeans_1d
from squeezekv.registry import make_allocation

ALLOCATIONS = squeezekv.allocation_names()


# -- SqueezeAttention --------------------------------------------------------------------------------------------


def test_squeeze_hand_computed_plan():
    # three clear clusters: low {0, 1, 7}, middle {2, 3}, high {4, 5, 6} (high similarity = least important)
    importance = [0.10, 0.12, 0.50, 0.52, 0.90, 0.91, 0.92, 0.11]
    budgets, details = SqueezeAllocation().allocate(100, 8, importance)
    # class 3 gets int(0.38 * 100) = 38; the 5 others share 800 - 3 * 38 = 686 = 5 * 137 + 1; the extra token goes
    # to the lowest-similarity layer (layer 0)
    assert budgets == [138, 137, 137, 137, 38, 38, 38, 137]
    assert sum(budgets) == 800
    assert details["cluster_of_layer"] == [0, 0, 1, 1, 2, 2, 2, 0]
    assert details["shrunk_layers"] == [4, 5, 6]
    assert details["cluster_centers"] == pytest.approx([0.11, 0.51, 0.91], abs=1e-6)
    assert details["importance"] == pytest.approx(importance)
    assert details["p"] == 0.38


def test_squeeze_remainder_goes_to_lowest_similarity_first():
    importance = [0.3, 0.95, 0.2, 0.6, 0.96, 0.1]  # high cluster {1, 4}
    budgets, _ = SqueezeAllocation(p=0.5).allocate(11, 6, importance)
    # small = int(5.5) = 5; others share 66 - 10 = 56 over 4 layers = 14 each, no remainder
    assert budgets == [14, 5, 14, 14, 5, 14]
    budgets, _ = SqueezeAllocation(p=0.5).allocate(10, 6, importance)
    # small = 5; others share 60 - 10 = 50 = 4 * 12 + 2: layers by similarity 5 (0.1), 2 (0.2) get the extra token
    assert budgets == [12, 5, 13, 12, 5, 13]


def test_squeeze_custom_p_and_clusters():
    importance = [0.1, 0.2, 0.8, 0.9]
    budgets, details = SqueezeAllocation(p=0.25, clusters=2).allocate(40, 4, importance)
    assert details["shrunk_layers"] == [2, 3]
    assert budgets == [70, 70, 10, 10]


def test_squeeze_single_cluster_is_uniform():
    budgets, details = SqueezeAllocation().allocate(50, 5, [0.7] * 5)
    assert budgets == [50] * 5
    assert "note" in details


def test_squeeze_total_is_constant_property():
    rng = random.Random(0)
    alloc = SqueezeAllocation()
    for trial in range(300):
        layers = rng.randint(1, 40)
        base = rng.choice([1, 2, 3, 5, 17, 64, 100, 257, 4096])
        importance = [rng.random() for _ in range(layers)]
        if trial % 5 == 0:  # duplicates and few distinct values
            importance = [round(v, 1) for v in importance]
        budgets, details = alloc.allocate(base, layers, importance)
        assert len(budgets) == layers
        assert sum(budgets) == base * layers, (trial, base, importance)
        assert all(isinstance(b, int) and b >= 1 for b in budgets)
        shrunk = details["shrunk_layers"]
        others = [i for i in range(layers) if i not in shrunk]
        if others and shrunk:
            assert all(budgets[i] == max(1, int(0.38 * base)) for i in shrunk)
            shares = [budgets[i] for i in others]
            assert max(shares) - min(shares) <= 1
            # the shrunk layers are exactly those of the highest-similarity cluster
            assert min(importance[i] for i in shrunk) > max(importance[i] for i in others)


def test_squeeze_allocation_needs_importance():
    with pytest.raises(ValueError, match="importance"):
        SqueezeAllocation().allocate(10, 4, None)
    with pytest.raises(ValueError, match="importance"):
        SqueezeAllocation().allocate(10, 4, [0.1, 0.2])


# -- exact 1-D k-means -------------------------------------------------------------------------------------------


def _sse(groups):
    total = 0.0
    for g in groups:
        m = sum(g) / len(g)
        total += sum((v - m) ** 2 for v in g)
    return total


def _brute_force(values, k):
    """Minimum within-cluster sum of squares over every split of the sorted values into k contiguous runs."""
    x = sorted(values)
    n = len(x)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        best = min(best, _sse([x[a:b] for a, b in zip(bounds, bounds[1:])]))
    return best


def test_kmeans_1d_matches_brute_force():
    rng = random.Random(1)
    for _trial in range(200):
        n = rng.randint(1, 9)
        values = [rng.uniform(-1, 1) for _ in range(n)]
        k = rng.randint(1, 4)
        labels, centers = kmeans_1d(values, k)
        k_eff = min(k, len(set(values)))
        assert len(centers) == k_eff
        assert sorted(set(labels)) == list(range(k_eff))
        groups = [[v for v, l in zip(values, labels) if l == c] for c in range(k_eff)]
        # centres are the cluster means, numbered by increasing centre
        for c, g in enumerate(groups):
            assert centers[c] == pytest.approx(sum(g) / len(g), abs=1e-12)
        assert centers == sorted(centers)
        assert _sse(groups) == pytest.approx(_brute_force(values, k_eff), abs=1e-12), (values, k)


def test_kmeans_1d_deterministic_and_order_independent():
    rng = random.Random(2)
    values = [rng.random() for _ in range(12)]
    first = kmeans_1d(values, 3)
    for _ in range(5):
        assert kmeans_1d(values, 3) == first
    perm = list(range(12))
    rng.shuffle(perm)
    labels, centers = kmeans_1d([values[i] for i in perm], 3)
    assert centers == pytest.approx(first[1])
    assert labels == [first[0][i] for i in perm]


def test_kmeans_1d_known_clusters():
    labels, centers = kmeans_1d([5.0, 1.0, 9.0, 1.2, 5.2, 9.1, 0.9], 3)
    assert labels == [1, 0, 2, 0, 1, 2, 0]
    assert centers == pytest.approx([31 / 30, 5.1, 9.05])
    assert kmeans_1d([2.0, 2.0, 2.0], 3) == ([0, 0, 0], [2.0])


def test_kmeans_1d_errors():
    with pytest.raises(ValueError):
        kmeans_1d([], 3)
    with pytest.raises(ValueError):
        kmeans_1d([1.0, 2.0], 0)


# -- pyramid / uniform -------------------------------------------------------------------------------------------


def test_pyramid_totals_constant_and_decreasing():
    rng = random.Random(3)
    for _ in range(300):
        layers = rng.randint(1, 48)
        base = rng.randint(1, 5000)
        beta = rng.choice([1.0, 2.0, 20.0, 50.0])
        if base * layers < layers:
            continue
        budgets, details = PyramidAllocation(beta=beta).allocate(base, layers)
        assert sum(budgets) == base * layers
        assert all(isinstance(b, int) and b >= 1 for b in budgets)
        assert all(a >= b for a, b in zip(budgets, budgets[1:])), budgets
        assert details["beta"] == beta
        if layers > 1 and base >= 40 and beta > 1:
            assert budgets[0] > budgets[-1]


def test_pyramid_default_shape():
    budgets, _ = PyramidAllocation().allocate(4096, 4)
    assert PyramidAllocation().beta == 20
    top, bottom = 4096 / 20, 2 * 4096 - 4096 / 20
    assert abs(budgets[-1] - top) < 2 and abs(budgets[0] - bottom) < 2
    assert budgets == sorted(budgets, reverse=True)
    assert PyramidAllocation().allocate(77, 1)[0] == [77]


def test_pyramid_is_a_rounding_of_the_documented_line():
    """pyramid.py: the top layer gets base/beta, the bottom 2*base - base/beta, layers in between on the straight
    line, rounded (largest remainder) to keep the total: every budget must be within one token of its exact value,
    and equal to it when that value is an integer."""
    for base, layers in [(100, 4), (100, 8), (40, 2), (20, 3), (4096, 4)]:
        budgets, _ = PyramidAllocation().allocate(base, layers)
        top = base / 20
        bottom = 2 * base - top
        line = [bottom - (bottom - top) * i / (layers - 1) for i in range(layers)]
        for b, exact in zip(budgets, line):
            assert abs(b - exact) < 1, (base, layers, budgets, line)
            if float(exact).is_integer():
                assert b == exact, (base, layers, budgets, line)


def test_uniform():
    for base, layers in [(1, 1), (7, 3), (4096, 32)]:
        budgets, details = UniformAllocation().allocate(base, layers)
        assert budgets == [base] * layers


@pytest.mark.parametrize("name", ALLOCATIONS)
def test_every_allocation_keeps_the_total(name):
    alloc = make_allocation(name)
    rng = random.Random(4)
    for _ in range(50):
        layers = rng.randint(1, 12)
        base = rng.randint(1, 300)
        importance = [rng.random() for _ in range(layers)] if alloc.needs_importance else None
        budgets, details = alloc.allocate(base, layers, importance)
        assert sum(budgets) == base * layers
        assert all(b >= 1 for b in budgets)
        assert isinstance(details, dict)


# -- SqueezeAttention importance measured on a real model ---------------------------------------------------------


def _manual_importance(model, ids, mask=None, norm_name=None):
    """Per layer: mean (over real prompt tokens) cosine similarity between the residual stream entering the decoder
    layer and that stream plus the attention block's output, recorded with plain forward hooks on the stock model."""
    before, after = {}, {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def pre(module, args, kwargs, i=i):
            before[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        def post(module, args, kwargs, output, i=i, layer=layer):
            out = output[0]
            if norm_name is not None:
                out = getattr(layer, norm_name)(out)
            after[i] = out.detach().clone()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(post, with_kwargs=True))
    try:
        model(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for i in before:
        cos = F.cosine_similarity(before[i], before[i] + after[i], dim=-1)  # [B, q]
        w = torch.ones_like(cos) if mask is None else mask.float()
        result[i] = float((cos * w).sum() / w.sum())
    return result


@pytest.mark.parametrize(
    "arch,norm", [("llama", None), ("qwen3", None), ("gemma3_text", "post_attention_layernorm")]
)
@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "leftpad2"])
def test_squeeze_importance_is_cosine_similarity(arch, norm, padded, make_model, make_ids, make_left_padded):
    if padded:
        ids, mask = make_left_padded([20, 13], 20, seed=21)
    else:
        ids, mask = make_ids(1, 20, seed=21), None
    # larger weights so the attention output visibly moves the residual stream (similarities spread out)
    stock = make_model(arch, initializer_range=0.2)
    expected = _manual_importance(stock, ids, mask, norm)
    model = make_model(arch, initializer_range=0.2)
    cache = squeezekv.make_cache(model, "window", 6, "squeeze")
    model(ids, attention_mask=mask, cache=cache)
    details = cache.plan.details
    assert len(details["importance"]) == len(cache.managed)
    for value, layer_idx in zip(details["importance"], cache.managed):
        assert value == pytest.approx(expected[layer_idx], abs=1e-5), (layer_idx, details["importance"], expected)
        assert cache.importance[layer_idx] == pytest.approx(expected[layer_idx], abs=1e-5)
    assert len(set(details["importance"])) > 1
    if norm is not None:  # the sandwich norm matters: without it the similarities would be clearly different
        plain = _manual_importance(make_model(arch, initializer_range=0.2), ids, mask, None)
        assert all(abs(plain[i] - expected[i]) > 1e-3 for i in cache.managed)
    # the plan is SqueezeAllocation's answer to those importances
    budgets, _ = SqueezeAllocation().allocate(6, len(cache.managed), [cache.importance[i] for i in cache.managed])
    assert [cache.plan.budgets[i] for i in cache.managed] == budgets
    assert cache.plan.base == 6 and cache.plan.total == 6 * len(cache.managed)
    for i in cache.managed:
        assert cache.layers[i].physical_length == cache.plan.budgets[i]


def test_squeeze_fraction_budget_resolves_on_prompt_length(make_model, make_ids):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "window", 0.25, "squeeze")
    assert cache.plan is None
    model(make_ids(1, 40), cache=cache)
    assert cache.plan.base == 10
    assert cache.plan.total == 40
    assert cache.plan.details["prompt_length"] == 40
    assert cache.plan.allocation == "squeeze"


# -- BudgetPlan and Budget ----------------------------------------------------------------------------------------


def test_budget_plan_properties():
    plan = BudgetPlan(budgets=(5, None, 7, 3), base=5, allocation="x", details={"a": (1, 2)})
    assert plan.total == 15
    assert plan.managed_layers == (0, 2, 3)
    assert len(plan) == 4 and plan[1] is None and plan[2] == 7
    d = plan.as_dict()
    assert d == {"allocation": "x", "base": 5, "total": 15, "budgets": [5, None, 7, 3], "details": {"a": [1, 2]}}
    assert "total 15 over 3 layers" in plan.summary()


@pytest.mark.parametrize("budgets", [(5, 0), (5, -1), (5, 2.5), (5, "3")])
def test_budget_plan_rejects_bad_layer_budget(budgets):
    with pytest.raises(ValueError, match="layer 1 budget"):
        BudgetPlan(budgets=budgets, base=5, allocation="x")


def test_budget_plan_rejects_bad_base():
    with pytest.raises(ValueError, match="base budget 0"):
        BudgetPlan(budgets=(5,), base=0, allocation="x")


@pytest.mark.parametrize(
    "given,value,fraction",
    [(0.2, 0.2, True), (1.0, 1.0, True), (1, 1.0, False), (256, 256.0, False), (2.0, 2.0, False),
     ("0.5", 0.5, True), ("64", 64.0, False), (" 8 ", 8.0, False)],
)
def test_budget_parse(given, value, fraction):
    b = Budget.parse(given)
    assert (b.value, b.is_fraction) == (value, fraction)
    assert Budget.parse(b) is b


def test_budget_tokens():
    assert Budget.parse(0.25).tokens(40) == 10
    assert Budget.parse(0.25).tokens(2) == 1  # round(0.5) = 0 -> at least one token
    assert Budget.parse(0.5).tokens(7) == 4  # round(3.5) = 4
    assert Budget.parse(1.0).tokens(33) == 33
    assert Budget.parse(12).tokens(5) == 12
    assert str(Budget.parse(12)) == "12 tokens" and str(Budget.parse(0.2)) == "0.2 of the prompt"


@pytest.mark.parametrize("method", ["window", "h2o"])
def test_squeeze_one_token_prompt_still_bounds_the_cache(method, make_model, make_ids):
    """Unconditional generation from a single BOS-like token: the squeeze plan must still be resolved and enforced,
    as it is for uniform allocation (which keeps the cache at its budget)."""
    model = make_model("llama")
    cache = squeezekv.make_cache(model, method, 8, "squeeze")  # shrunk layers get int(0.38 * 8) = 3 >= h2o's 2
    model(make_ids(1, 1), cache=cache)
    for t in range(12):
        model(make_ids(1, 1, seed=t), cache=cache)
    assert cache.plan is not None
    assert cache.plan.total == 8 * len(cache.managed)
    for i in cache.managed:
        assert cache.layers[i].physical_length <= cache.plan.budgets[i]


@pytest.mark.parametrize("method", ["window", "h2o"])
def test_uniform_one_token_prompt_bounds_the_cache(method, make_model, make_ids):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, method, 4, "uniform")
    model(make_ids(1, 1), cache=cache)
    for t in range(10):
        model(make_ids(1, 1, seed=t), cache=cache)
    assert cache.plan.budgets == (4, 4, 4, 4)
    assert cache.physical_lengths() == [4, 4, 4, 4]
    assert cache.get_seq_length() == 11


# -- fraction budgets are capped at the prompt length -------------------------------------------------------------


def test_cap_budgets_examples():
    from squeezekv.plan import cap_budgets

    # surplus 14 + 4 = 18 goes to layers 2 and 3 until they reach the cap
    assert cap_budgets([30, 20, 10, 4], 16) == ([16, 16, 16, 16], 18)
    # surplus 20 spread evenly (extras first) over the three layers below the cap
    assert cap_budgets([40, 10, 10, 10], 20) == ([20, 17, 17, 16], 20)
    assert cap_budgets([5, 6], 10) == ([5, 6], 0)
    # not enough room: everything at the cap, the rest is lost
    assert cap_budgets([30, 30], 10) == ([10, 10], 40)


def test_cap_budgets_property():
    from squeezekv.plan import cap_budgets

    rng = random.Random(6)
    for _ in range(500):
        n = rng.randint(1, 12)
        budgets = [rng.randint(1, 60) for _ in range(n)]
        cap = rng.randint(1, 40)
        out, moved = cap_budgets(budgets, cap)
        assert len(out) == n and all(1 <= b <= cap for b in out)
        assert moved == sum(max(0, b - cap) for b in budgets)
        assert sum(out) == min(sum(budgets), n * cap)
        # layers never lose tokens except by the cap
        assert all(o >= min(b, cap) for o, b in zip(out, budgets))


def test_fraction_budget_plan_is_capped_at_prompt_length(make_model, make_ids):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "window", 0.9, "pyramid")
    model(make_ids(1, 24), cache=cache)
    plan = cache.plan
    # base round(0.9 * 24) = 22; pyramid gives [43, 29, 15, 1]; capped at 24 with the surplus moved down the stack
    assert plan.base == 22
    assert plan.budgets == (24, 24, 24, 16)
    assert plan.total == 88
    assert plan.details["capped_at_prompt_length"] == 24
    assert plan.details["tokens_redistributed"] == 24
    assert cache.physical_lengths() == [24, 24, 24, 16]


def test_token_budget_plan_is_not_capped(make_model, make_ids):
    model = make_model("llama")
    cache = squeezekv.make_cache(model, "window", 22, "pyramid")
    model(make_ids(1, 24), cache=cache)
    assert cache.plan.budgets == (43, 29, 15, 1)
    assert "capped_at_prompt_length" not in cache.plan.details
    assert cache.physical_lengths() == [24, 24, 15, 1]
