"""The layer's structure (issue 14): no import circle through the cache and the attention function, the static-mode
capability checked in one place, and the public :meth:`SqueezeLayer.fill`, which puts given keys/values in a layer
as if a prompt had been prefilled and compressed (what the benchmark and the store's restore use)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import squeezekv
from squeezekv import bench
from squeezekv.channel import coupled as cq
from squeezekv.channel.eigen_calibrate import calibrate, save
from squeezekv.graphs import GraphDecoder
from squeezekv.plan import BudgetPlan

PROMPT, NEW, BUDGET = 24, 8, 10
KIVI_SMALL = {"bits": 2, "group_size": 8, "residual": 8}
PKG = Path(squeezekv.__file__).parent


# -- import graph ---------------------------------------------------------------------------------------------------
def _imports() -> dict[str, set[str]]:
    """Module -> the squeezekv modules it imports anywhere in its file (also inside functions)."""
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    graph = {}
    for m, (p, is_pkg) in mods.items():
        base = m.split(".") if is_pkg else m.split(".")[:-1]
        out = set()
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                mod = ".".join(base[: len(base) - n.level + 1] + ([n.module] if n.module else [])) if n.level \
                    else (n.module or "")
                targets = [mod] + [f"{mod}.{a.name}" for a in n.names]
            else:
                continue
            out.update(t for t in targets if t in mods and t != m)
        graph[m] = out
    return graph


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    todo, seen = [start], set()
    while todo:
        m = todo.pop()
        for t in graph[m] - seen:
            if t == goal:
                return True
            seen.add(t)
            todo.append(t)
    return False


def test_attention_math_imports_neither_cache_nor_attention():
    graph = _imports()
    for other in ("squeezekv.cache", "squeezekv.attention"):
        assert not _reaches(graph, "squeezekv.attention_math", other)
    assert not _reaches(graph, "squeezekv.layer_storage", "squeezekv.cache")


def test_no_import_circle_through_the_cache_or_the_attention_function():
    graph = _imports()
    for m in ("squeezekv.cache", "squeezekv.attention", "squeezekv.layer_storage", "squeezekv.attention_math"):
        assert not _reaches(graph, m, m), f"{m} imports itself through other modules"


# -- static capability ----------------------------------------------------------------------------------------------
def _eigen_params(model, tmp_path):
    g = torch.Generator().manual_seed(99)
    seqs = [torch.randint(3, model.config.vocab_size, (48,), generator=g).tolist() for _ in range(4)]
    path = tmp_path / "eigen.pt"
    save(calibrate(model, seqs), path)
    return {"channel": "eigen", "channel_params": {"calibration": str(path), "rank": 6}}


def _coupled_params(model, tmp_path):
    m = cq.CoupledQuant(bits=1, channels=4)
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(99))
    m.set_codebooks(cq.calibrate(model, ids, 1, 4, iters=5))
    m.save(tmp_path / "cq.pt")
    return {"channel": "coupled", "channel_params": {"bits": 1, "channels": 4, "calibration": str(tmp_path / "cq.pt")}}


#: cache settings whose layers cannot run static -> (first refused layer, its class, method named in the error)
REFUSED = {
    "kivi": (lambda m, p: {"channel": "kivi", "channel_params": KIVI_SMALL}, 0, "KIVILayer", "channel method 'kivi'"),
    "coupled": (_coupled_params, 0, "CoupledLayer", "channel method 'coupled'"),
    "eigen": (_eigen_params, 0, "EigenLayer", "channel method 'eigen'"),
    "minicache": (lambda m, p: {"crosslayer": "minicache", "crosslayer_params": {"start_layer": 2}}, 2,
                  "MiniCacheLayer", "cross-layer method 'minicache'"),
    "shared_attention": (lambda m, p: {"crosslayer": "shared_attention", "crosslayer_params": {"spans": [[1, 3]]}},
                         1, "SourceLayer", "cross-layer method 'shared_attention'"),
    "shared_attention+kivi": (lambda m, p: {"crosslayer": "shared_attention", "crosslayer_params": {"spans": [[1, 3]]},
                                            "channel": "kivi", "channel_params": KIVI_SMALL},
                              0, "KIVILayer", "channel method 'kivi' and the cross-layer method 'shared_attention'"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_graph_decoder_refuses_layers_without_static_support(name, make_model, make_ids, tmp_path):
    """One ValueError naming the layer and the method, raised before any layer moved to its static buffers: the cache
    still decodes as before."""
    settings, layer_idx, cls, method = REFUSED[name]
    model = make_model("llama", layers=4)
    ids = make_ids(1, PROMPT + 1)
    cache = squeezekv.make_cache(model, "window", 16, **settings(model, tmp_path), allocation="uniform")
    model(ids[:, :PROMPT], cache=cache)
    with pytest.raises(ValueError) as err:
        GraphDecoder(model, cache, chunk=4, use_graph=False)
    msg = str(err.value)
    assert msg.startswith(f"static (CUDA-graph) decoding is not supported by layer {layer_idx} ({cls}")
    assert method in msg
    assert all(layer.static is None for layer in cache.layers)
    assert [type(layer).supports_static for layer in cache.layers][:layer_idx] == [True] * layer_idx
    model(ids[:, PROMPT:], cache=cache)  # still a working dynamic cache
    assert cache.get_seq_length() == PROMPT + 1


def test_no_layer_class_overrides_enter_static_to_refuse():
    """The capability is a class attribute; ``enter_static`` is SqueezeLayer's alone."""
    import squeezekv.channel.coupled  # noqa: E401,F401
    import squeezekv.channel.eigen
    import squeezekv.channel.kivi
    import squeezekv.crosslayer.minicache  # noqa: E401,F401
    import squeezekv.crosslayer.shared_attention

    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)

    classes = set(subclasses(squeezekv.SqueezeLayer))
    assert {c.__name__ for c in classes} >= {"KIVILayer", "CoupledLayer", "EigenLayer", "MiniCacheLayer",
                                              "SourceLayer", "SharedLayer"}
    assert all("enter_static" not in vars(c) for c in classes)
    assert squeezekv.SqueezeLayer.supports_static


# -- fill ------------------------------------------------------------------------------------------------------------
def _held(cache):
    """Each layer's held keys/values/positions/scores and tokens seen (copies)."""
    return [(l.keys.clone(), l.values.clone(), l.token_idx.clone(), None if l.scores is None else l.scores.clone(),
             l.seen) for l in cache.layers]


def _decode(model, cache, ids, mask=None):
    """Logits of each of ``ids`` ``[B, m]`` fed one at a time (teacher forcing)."""
    out = []
    for k in range(ids.shape[1]):
        kw = {} if mask is None else {"attention_mask": mask[:, : mask.shape[1] - ids.shape[1] + k + 1]}
        out.append(model(ids[:, k:k + 1], cache=cache, **kw).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("method", squeezekv.policy_names())
def test_fill_then_decode_equals_prefill_then_decode(method, make_model, make_ids, method_params):
    model = make_model("llama")
    ids = make_ids(1, PROMPT + NEW)

    def cache():
        return squeezekv.make_cache(model, method, BUDGET, method_params=method_params(method), allocation="uniform")

    ref = cache()
    model(ids[:, :PROMPT], cache=ref)
    held = _held(ref)
    assert any(h[2].shape[-1] < PROMPT for h in held) or method == "none"  # something was evicted
    want = _decode(model, ref, ids[:, PROMPT:])
    filled = cache()
    for layer, (k, v, idx, scores, seen) in zip(filled.layers, held):
        layer.fill(k, v, idx, scores, seen=seen)
    assert filled.plan == ref.plan and filled.get_seq_length() == PROMPT
    got = _decode(model, filled, ids[:, PROMPT:])
    assert torch.equal(got, want)
    assert [l.token_idx.tolist() for l in filled.layers] == [l.token_idx.tolist() for l in ref.layers]


def test_fill_with_left_padding_and_a_given_plan(make_model, make_left_padded):
    """Rows of different lengths (the padding flags come from the mask passed while decoding) and a SqueezeAttention
    cache, which needs its plan given."""
    model = make_model("llama")
    ids, mask = make_left_padded([PROMPT, PROMPT - 7], PROMPT + NEW)
    ref = squeezekv.make_cache(model, "h2o", BUDGET, "squeeze")
    model(ids[:, :PROMPT], attention_mask=mask[:, :PROMPT], cache=ref)
    held = _held(ref)
    want = _decode(model, ref, ids[:, PROMPT:], mask)
    with pytest.raises(ValueError, match="allocation 'squeeze'.*plan"):
        squeezekv.make_cache(model, "h2o", BUDGET, "squeeze").layers[0].fill(*held[0][:4], seen=PROMPT)
    filled = squeezekv.make_cache(model, "h2o", BUDGET, "squeeze", plan=ref.plan)
    for layer, (k, v, idx, scores, seen) in zip(filled.layers, held):
        layer.fill(k, v, idx, scores, seen=seen)
    assert torch.equal(_decode(model, filled, ids[:, PROMPT:], mask), want)


@pytest.mark.parametrize("method", ["window", "h2o"])
def test_filled_kivi_layer_quantises_as_after_a_prefill(method, make_model, make_ids):
    """A KIVI prefill evicts on exact keys/values, then quantises the survivors: filling a KIVI cache with what a
    plain cache kept after the same prefill gives the same codes and the same decoding."""
    model = make_model("llama")
    ids = make_ids(1, PROMPT + NEW)
    plain = squeezekv.make_cache(model, method, 16, allocation="uniform")
    model(ids[:, :PROMPT], cache=plain)
    ref = squeezekv.make_cache(model, method, 16, channel="kivi", channel_params=KIVI_SMALL, allocation="uniform")
    model(ids[:, :PROMPT], cache=ref)
    filled = squeezekv.make_cache(model, method, 16, channel="kivi", channel_params=KIVI_SMALL, allocation="uniform")
    for layer, (k, v, idx, scores, seen) in zip(filled.layers, _held(plain)):
        layer.fill(k, v, idx, scores, seen=seen)
    for a, b in zip(filled.layers, ref.layers):
        assert a.nq == b.nq == 8
        for name in ("kcode", "kscale", "vcode", "keys", "values", "token_idx"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(_decode(model, filled, ids[:, PROMPT:]), _decode(model, ref, ids[:, PROMPT:]))


def test_fill_defaults_hold_an_uncompressed_prompt(make_model, make_ids):
    """positions default to 0..n-1 and seen to n: the same as prefilling n tokens that nothing evicted."""
    model = make_model("llama")
    ids = make_ids(1, 12 + NEW)
    ref = squeezekv.make_cache(model, "window", 64, allocation="uniform")
    model(ids[:, :12], cache=ref)
    held = _held(ref)
    filled = squeezekv.make_cache(model, "window", 64, allocation="uniform")
    for layer, (k, v, *_rest) in zip(filled.layers, held):
        layer.fill(k, v)
    assert not any(l.compressed for l in filled.layers) and filled.get_seq_length() == 12
    assert torch.equal(_decode(model, filled, ids[:, 12:]), _decode(model, ref, ids[:, 12:]))


def test_fill_refuses_bad_input_by_name(make_model):
    model = make_model("llama", layers=2)
    k = torch.randn(1, 2, 4, 16)
    layer = squeezekv.make_cache(model, "window", 8, allocation="uniform").layers[0]
    cases = [
        (dict(keys=k[0], values=k[0]), "keys must be a floating-point tensor"),
        (dict(keys=k, values=k[:, :, :3]), "values .* must match keys"),
        (dict(keys=k, values=k.double()), "must match keys"),
        (dict(keys=k[:, :, :0], values=k[:, :, :0]), "n = 0"),
        (dict(keys=k, values=k, positions=torch.tensor([0.0, 1, 2, 3])), "integer tensor"),
        (dict(keys=k, values=k, positions=torch.arange(3)), r"shape \(3,\); allowed: \(4,\) or \(1, 2, 4\)"),
        (dict(keys=k, values=k, positions=torch.tensor([0, 2, 2, 3])), "strictly ascending"),
        (dict(keys=k, values=k, positions=torch.tensor([-1, 0, 1, 2]), seen=4), r"0\.\.3"),
        (dict(keys=k, values=k, seen=3), "seen=3 is out of range: an integer in 4..256"),
        (dict(keys=k, values=k, seen=300), "seen=300"),
        (dict(keys=k, values=k, positions=torch.arange(4) + 5, seen=6), r"0\.\.5"),
        (dict(keys=k, values=k, scores=torch.zeros(1, 2, 4)), "policy 'window' keeps no scores"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            layer.fill(**kwargs)
        assert layer.seen == 0
    h2o = squeezekv.make_cache(model, "h2o", 8, allocation="uniform").layers[0]
    with pytest.raises(ValueError, match=r"scores must be a tensor \(1, 2, 4\)"):
        h2o.fill(k, k, scores=torch.zeros(1, 2, 3))
    layer.fill(k, k)
    with pytest.raises(ValueError, match="already holds 4 tokens"):
        layer.fill(k, k)


def test_fill_copies_the_scores(make_model):
    model = make_model("llama", layers=2)
    k, scores = torch.randn(1, 2, 4, 16), torch.rand(1, 2, 4)
    layer = squeezekv.make_cache(model, "h2o", 8, allocation="uniform").layers[0]
    layer.fill(k, k, scores=scores)
    assert torch.equal(layer.scores, scores) and layer.scores.data_ptr() != scores.data_ptr()


@pytest.mark.parametrize("settings, cls", [
    ({"crosslayer": "minicache", "crosslayer_params": {"start_layer": 0}}, "MiniCacheLayer"),
    ({"crosslayer": "shared_attention", "crosslayer_params": {"spans": [[0, 1]]}}, "SourceLayer"),
])
def test_fill_refuses_layers_with_shared_storage(settings, cls, make_model):
    model = make_model("llama", layers=2)
    cache = squeezekv.make_cache(model, "window", 8, **settings, allocation="uniform")
    k = torch.randn(1, 2, 4, 16)
    with pytest.raises(TypeError, match=f"layer 0 \\({cls}\\) cannot be filled"):
        cache.layers[0].fill(k, k)


def test_bench_fills_through_the_public_method(make_model):
    """The benchmark's pre-filled cache: each layer holds the last ``budget`` of ``context`` positions, as after a
    compressed prompt, and decodes (evicting back to the budget)."""
    model = make_model("llama")
    cache = bench.make_cache(model, "method=h2o", 8, batch=2, context=40, fill=True, device="cpu")
    squeezekv.attach(model)
    assert cache.get_seq_length() == 40 and cache.physical_lengths() == [8] * 4
    assert all(l.token_idx[0, 0].tolist() == list(range(32, 40)) and l.prefill_done for l in cache.layers)
    model(torch.ones(2, 1, dtype=torch.long), cache=cache)
    assert cache.physical_lengths() == [8] * 4 and cache.get_seq_length() == 41
    assert cache.plan == BudgetPlan(budgets=(8,) * 4, base=8, allocation="uniform")
