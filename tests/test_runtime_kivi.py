"""KIVI on the decode runtime (squeezekv.runtime.kivi_pool): the pool's bytes, its flushes bit for bit equal to the
eager KIVI layer's codes, and batched decoding equal to each request's eager decoding -- through the PyTorch reference
here, through the fused kernels under Triton's CPU interpreter (fresh process) and on the GPU (marked)."""

from __future__ import annotations

import importlib

import pytest
import torch

import squeezekv
from squeezekv.cache import allocated_nbytes
from squeezekv.runtime.kivi_pool import KiviPool
from squeezekv.runtime.pool import KVPool
from squeezekv.runtime.pools import pool_for_cache
from squeezekv.runtime.runtime import DecodeRuntime
from triton_kernels import interpreter_module, run_in_fresh_process

KIVI = dict(bits=2, group_size=4, residual=8)
CHUNK = 4
PROMPTS = (5, 24, 37)  # 5: the whole prompt in the residual (no quantised position yet)
STEPS = 14  # three or four flushes per request


@pytest.fixture(scope="module")
def kernels():
    """The runtime's and KIVI's kernel modules imported with the interpreter on."""
    gens = [interpreter_module("squeezekv.runtime.decode_triton"), interpreter_module("squeezekv.channel.kivi_triton")]
    mods = [next(g) for g in gens]
    yield mods
    for g in gens:
        next(g, None)


def test_kernel_tests_in_a_fresh_process():
    run_in_fresh_process(__file__)


def _prefill(model, n, method, budget, method_params, device="cpu", **kivi):
    cache = squeezekv.make_cache(model, method, budget, "uniform", channel="kivi", channel_params={**KIVI, **kivi},
                                 evict_every=CHUNK, method_params=method_params(method))
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    return cache, model(ids, cache=cache).logits[:, -1]  # [1, vocab]


def _same_quantised_state(pool, slot, cache, prompt_kept):
    """The slot holds the eager layer's quantised state and residual. Groups quantised from prompt tokens (the first
    ``prompt_kept`` entries, the same input in both) agree bit for bit; groups of tokens decoded in a batch (keys
    computed by the batched step, within float rounding of the eager step's) agree to 1e-5 in scales and zeros
    and to one level in codes."""
    from squeezekv.channel.packing import unpack

    g = pool.group_size
    for i, layer in enumerate(cache.layers):
        nq, r = layer.nq, layer.residual_length
        assert pool.host_nq[i][slot] == nq == int(pool.nq[i, slot]) and pool.host_lengths[i][slot] == r
        e = min(nq, prompt_kept // g * g)  # quantised from prompt tokens only
        for name in ("kcode", "vcode", "vscale", "vzero", "kscale", "kzero"):
            per = g if name in ("kscale", "kzero") else 1
            ours, theirs = getattr(pool, name)[i][slot], getattr(layer, name)[0]
            assert torch.equal(ours[:, :e // per], theirs[:, :e // per]), (i, name)
            a, b = ours[:, e // per:nq // per], theirs[:, e // per:nq // per]
            if name.endswith("code"):
                assert torch.all((unpack(a, pool.bits).int() - unpack(b, pool.bits).int()).abs() <= 1)
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(pool.keys[i][slot, :, :r], layer.keys[0], rtol=0, atol=1e-5)
        assert torch.equal(pool.positions[i][slot, :, :r], layer.token_idx[0, :, nq:])


def _decode_equals_eager(model, method, budget, method_params, *, device="cpu", backend="auto", compile=False,
                         atol=1e-4, state=True, steps=STEPS, **kivi):
    """Both paths fed the eager path's greedy tokens; with ``state`` (float32) the runtime's own greedy tokens must
    be the same and the quantised state is compared too."""
    reqs = [_prefill(model, n, method, budget, method_params, device, **kivi) for n in PROMPTS]
    kept = [cache.layers[0].physical_length for cache, _ in reqs]  # prompt tokens each request holds
    pool = pool_for_cache(reqs[2][0], 4, steps + 1)
    assert isinstance(pool, KiviPool)
    rt = DecodeRuntime(model, pool, reqs[0][0].policy, CHUNK, backend=backend, compile=compile)
    slots = [rt.join(cache) for cache, _ in reqs]
    eager = [logits for _, logits in reqs]
    got = torch.cat(eager)
    flushes = 0
    for _ in range(steps):
        toks = torch.cat(eager).argmax(-1)  # [3]
        if state:
            assert torch.equal(got.argmax(-1), toks)
        before = int(pool.host_nq[0][slots[1]])
        got = rt.step(slots, toks)
        flushes += int(pool.host_nq[0][slots[1]]) > before
        for r, (cache, _) in enumerate(reqs):
            eager[r] = model(toks[r].view(1, 1), cache=cache).logits[:, -1]
            torch.testing.assert_close(got[r:r + 1].float(), eager[r].float(), rtol=0, atol=atol)
            if state:
                _same_quantised_state(pool, slots[r], cache, kept[r])
    assert flushes >= 3
    return rt


@pytest.mark.parametrize("method,budget", [("none", 1.0), ("snapkv", 16)])
def test_kivi_runtime_equals_eager(method, budget, make_model, method_params):
    """Every flush quantises what the eager layer quantises and the logits agree, for requests of three
    prompt lengths decoding together (one of them still all residual)."""
    _decode_equals_eager(make_model("llama"), method, budget, method_params)


def test_kivi_runtime_at_four_bits(make_model, method_params):
    _decode_equals_eager(make_model("llama"), "none", 1.0, method_params, bits=4)


def test_kivi_pool_bytes_equal_the_formula():
    caps, seqs, h, d, g, r = [8, 16], 3, 2, 16, 4, 8
    pool = KiviPool(caps, seqs, h, d, bits=2, group_size=g, residual=r, dtype=torch.bfloat16)
    p, item = d * 2 // 8, 2
    quant = sum(h * (c * (2 * p + 2 * (d // g) * item) + (c // g) * 2 * d * item) for c in caps)
    residual = sum(h * (r + g) * (2 * d * item + 4) for _ in caps) + len(caps) * h * 4 + 8
    assert pool.slot_nbytes() == quant + residual + len(caps) * 4
    assert pool.nbytes() == (seqs + 1) * pool.slot_nbytes() == allocated_nbytes(pool.tensors())


def test_kivi_runtime_refuses_what_it_cannot_do(make_model, method_params):
    model = make_model("llama")
    cache, _ = _prefill(model, 24, "none", 1.0, method_params)
    pool = pool_for_cache(cache, 2, 1)
    with pytest.raises(ValueError, match="quantised slots"):
        KVPool.for_cache(cache, 2, 1)
    with pytest.raises(ValueError, match="quant_capacities"):
        KiviPool([6], 1, 2, 16, group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        KiviPool([8], 1, 2, 16, group_size=5)
    rt = DecodeRuntime(model, pool, cache.policy, CHUNK)
    other = KiviPool(list(pool.quant_capacities), 1, 2, 16, bits=4, group_size=4, residual=8)
    other.acquire()
    with pytest.raises(ValueError, match="quantises at 2 bits"):
        other.admit(0, cache)
    window, _ = _prefill(model, 24, "window", 16, method_params)
    with pytest.raises(ValueError, match="policy"):
        rt.join(window)
    slot = rt.join(cache)
    with pytest.raises(ValueError, match="residual"):
        rt.kept_positions(slot, 0)
    tok = torch.tensor([3])
    with pytest.raises(ValueError, match="is full"):  # room for one new token, rounded up to a group
        for _ in range(40):
            rt.step([slot], tok)
    assert pool.host_nq[0][slot] == pool.quant_capacities[0]  # raised before the step that would overflow


@pytest.mark.parametrize("compile", [False, True])
def test_kivi_runtime_with_the_kernels_equals_eager(kernels, compile, make_model, method_params):
    """The fused kernels (interpreted) over the pool's slots, eager or compiled, equal the eager path."""
    _decode_equals_eager(make_model("llama", layers=2), "none", 1.0, method_params, backend="triton",
                         compile=compile)


def test_pool_kernel_equals_reference(kernels):
    """The pool kernel against the pool's PyTorch reference on scattered slots of different fill counts (nq 0 and
    the whole capacity included) and residual lengths."""
    gen = torch.Generator().manual_seed(1)
    pool = KiviPool([16, 16], 5, 2, 16, bits=2, group_size=4, residual=8)
    for t in (*pool.kcode, *pool.vcode):
        t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
    for t in (*pool.kscale, *pool.vscale, *pool.keys, *pool.values):
        t.copy_(torch.rand(t.shape, generator=gen))
    for t in (*pool.kzero, *pool.vzero):
        t.copy_(torch.randn(t.shape, generator=gen))
    pool.nq.copy_(torch.tensor([[0, 16, 8, 4, 12, 0], [16, 0, 4, 8, 12, 0]], dtype=torch.int32))
    slots = torch.tensor([3, 0, 1, 4])
    lengths = torch.tensor([[1, 1], [12, 12], [5, 5], [7, 7]], dtype=torch.int32)
    q = torch.randn(4, 4, 1, 16, generator=gen)
    for layer in (0, 1):
        ref = pool.reference_attend(layer, q, slots, lengths, 0.25)
        got = pool.attend(layer, q, slots, lengths, 0.25, importlib.import_module("squeezekv.runtime.ops"))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_kivi_runtime_equals_eager(compile, make_model, method_params):
    """On the GPU: the step captured as a CUDA graph with the fused KIVI kernels (compiled or not), bf16, KIVI's
    groups of 32 at a head dim of 64, equals the eager KIVI path within bf16 tolerance over three flushes."""
    model = make_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64).to("cuda", torch.bfloat16)
    rt = _decode_equals_eager(model, "none", 1.0, method_params, device="cuda", compile=compile, atol=3e-2,
                              state=False, steps=120, group_size=32, residual=8)
    assert rt.kivi_kernel and rt.use_graph


def test_kivi_export_writes_back_what_the_eager_layer_holds(make_model, method_params):
    """KiviPool.export: after decoding in the pool, the admitted cache holds what the same request decoded eagerly
    holds -- positions, counts and tokens seen exactly, the pool's codes/scales bit for bit, the state within the
    tolerance of :func:`_same_quantised_state` -- and decodes on from there like the eager cache."""
    model = make_model("llama")
    pairs = [(_prefill(model, n, "snapkv", 16, method_params), _prefill(model, n, "snapkv", 16, method_params))
             for n in (24, 37)]
    kept = [a[0].layers[0].physical_length for a, _ in pairs]
    pool = pool_for_cache(pairs[1][0][0], 2, STEPS + 1)
    rt = DecodeRuntime(model, pool, pairs[0][0][0].policy, CHUNK)
    slots = [rt.join(a[0]) for a, _ in pairs]
    toks = torch.cat([b[1] for _, b in pairs]).argmax(-1)  # [2]
    for _ in range(STEPS):
        rt.step(slots, toks)
        nxt = [model(toks[r].view(1, 1), cache=b[0]).logits[:, -1] for r, (_, b) in enumerate(pairs)]
        toks = torch.cat(nxt).argmax(-1)
    for r, ((a, _), (b, _)) in enumerate(pairs):
        pool.export(slots[r], a)
        for i, (x, y) in enumerate(zip(a.layers, b.layers)):
            assert (x.nq, x.seen, x.residual_length) == (y.nq, y.seen, y.residual_length)
            assert torch.equal(x.token_idx, y.token_idx)
            assert torch.equal(x.kcode, pool.kcode[i][slots[r]:slots[r] + 1, :, :x.nq])
        _same_quantised_state(pool, slots[r], b, kept[r])
        tok = toks[r].view(1, 1)
        torch.testing.assert_close(model(tok, cache=a).logits, model(tok, cache=b).logits, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="KIVI SqueezeCache"):
        pool.export(slots[0], squeezekv.make_cache(model, "snapkv", 16, "uniform"))
