"""The fused KIVI decode kernel (squeezekv.channel.kivi_triton) against the PyTorch reference path.

The kernel tests run Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before the kernel module is imported) and
are skipped when triton is not installed (CI); the ``kernel`` parameter's validation runs everywhere."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import squeezekv
from squeezekv.channel import kernels
from squeezekv.channel.kernels import CoupledKernelConfig, KiviKernelConfig
from squeezekv.channel.packing import pack
from squeezekv.channel.quantized import QuantizedLayer
from triton_kernels import compiled_module, interpreter_module, run_in_fresh_process

PROMPT = 40
KIVI_SMALL = {"bits": 2, "group_size": 8, "residual": 8}


@pytest.fixture(scope="module")
def kt():
    """``squeezekv.channel.kivi_triton`` imported with the interpreter on (dropped again afterwards)."""
    yield from interpreter_module("squeezekv.channel.kivi_triton")


def test_kernel_tests_in_a_fresh_process():
    """When this process imported triton without the interpreter, run the kernel tests in a fresh one."""
    run_in_fresh_process(__file__)


def _state_reference(q, kc, vc, ks, kz, vs, vz, gid, bits, gs, scaling):
    """(max, sum, acc) from explicitly dequantised keys/values, float64."""
    from squeezekv.channel.packing import unpack

    b, h, nq, _ = kc.shape
    grp = gid.long() if gid is not None else (torch.arange(nq) // gs).expand(b, h, nq)
    idx = grp[..., None].expand(-1, -1, -1, ks.shape[-1])
    keys = unpack(kc, bits).double() * ks.double().gather(2, idx) + kz.double().gather(2, idx)
    vcod = unpack(vc, bits).double()
    dv = vcod.shape[-1]
    values = (vcod.view(b, h, nq, dv // gs, gs) * vs.double()[..., None] + vz.double()[..., None]).view(b, h, nq, dv)
    logits = torch.einsum("bhgd,bhnd->bhgn", q.double(), keys) * scaling
    m = logits.amax(-1)
    p = torch.exp(logits - m[..., None])
    return m, p.sum(-1), torch.einsum("bhgn,bhnd->bhgd", p, values)


def _random_storage(gen, bits, d, g, with_gid, dtype, b, h, nq, gs=32):
    """Random packed KIVI storage and queries: (q, kcode, vcode, kscale, kzero, vscale, vzero, kgid or None)."""
    ng = (nq + gs - 1) // gs + (2 if with_gid else 0)
    codes = torch.randint(0, 1 << bits, (2, b, h, nq, d), generator=gen, dtype=torch.uint8)
    kc, vc = pack(codes[0], bits), pack(codes[1], bits)
    ks = (torch.rand(b, h, ng, d, generator=gen) * 0.5).to(dtype)
    kz = torch.randn(b, h, ng, d, generator=gen).to(dtype)
    vs = (torch.rand(b, h, nq, d // gs, generator=gen) * 0.5).to(dtype)
    vz = torch.randn(b, h, nq, d // gs, generator=gen).to(dtype)
    gid = torch.randint(0, ng, (b, h, nq), generator=gen).sort(-1).values.to(torch.int16) if with_gid else None
    q = torch.randn(b, h, g, d, generator=gen).to(dtype)
    return q, kc, vc, ks, kz, vs, vz, gid


@pytest.mark.parametrize("bits,d,g,with_gid,splits,block_n,dtype,variant", [
    (2, 64, 1, False, 1, 64, torch.float32, "interleaved"),  # group rows loaded once (block a multiple of the group)
    (2, 64, 1, False, 1, 32, torch.float32, "planes"),  # planes: one key group per block
    (2, 128, 4, True, 3, 16, torch.float32, "interleaved"),  # group ids
    (2, 128, 4, True, 3, 16, torch.float32, "planes"),
    (4, 64, 3, True, None, 32, torch.float32, "planes"),
    (4, 128, 1, False, 2, 16, torch.float32, "interleaved"),  # block smaller than a group: per-token group rows
    (4, 128, 1, False, 2, 64, torch.float32, "planes"),  # planes: block over 2 key groups (per-token rows)
    (2, 96, 2, False, 2, 64, torch.float32, "interleaved"),  # channels padded to a power of 2, 3 value groups
    (2, 96, 2, False, 2, 16, torch.float32, "planes"),
    (2, 64, 3, False, 4, 32, torch.bfloat16, "planes"),
    (4, 64, 4, True, None, 16, torch.float16, "interleaved"),
    (2, 64, 2, True, 19, 16, torch.float32, "planes"),  # more splits than the reduction reads at once (nq 300 here)
    (2, 64, 1, False, 2, 32, torch.float32, "planes_fma"),  # broadcast products: no padded query rows
    (4, 128, 3, True, 3, 16, torch.float32, "planes_fma"),
    (2, 128, 4, False, None, 64, torch.bfloat16, "planes_fma"),
    (2, 16, 2, True, 2, 16, torch.float32, "planes_fma"),  # 4 bytes of codes per token: fine without tl.dot
])
def test_kernel_state_equals_dequantised_reference(kt, bits, d, g, with_gid, splits, block_n, dtype, variant):
    """Random packed storage (nq not a multiple of the block, several splits, groups from kgid or p // 32):
    the kernel's (max, sum, acc) equals attention over the explicitly dequantised keys/values."""
    assert kt.choose_variant(d, d, bits, 32 if d > 16 else 8, variant) == variant
    gen = torch.Generator().manual_seed(bits * d + g)
    (b, h, nq), gs = (1, 2, 300) if splits == 19 else (2, 2, 77), (32 if d > 16 else 8)
    st = _random_storage(gen, bits, d, g, with_gid, dtype, b, h, nq, gs)
    m, s, acc = kt.decode_state(*st, bits, gs, 0.125, splits=splits,
                                config=KiviKernelConfig(variant=variant, block_n=block_n))
    rm, rs, racc = _state_reference(*st, bits, gs, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # half precision: keys/values/weights rounded before the products
    torch.testing.assert_close(m.double(), rm, atol=tol * 4, rtol=tol)
    torch.testing.assert_close((acc / s[..., None]).double(), racc / rs[..., None], atol=tol * 4, rtol=tol)
    torch.testing.assert_close(s.double() * torch.exp(m.double() - rm), rs, atol=tol, rtol=tol * 4)


def _with_residual(state, q, rk, rv, scaling):
    """Normalised attention output (float64) from a quantised state (max, sum, acc) and residual keys/values."""
    m, s, acc = state
    logits = torch.einsum("bhgd,bhnd->bhgn", q.double(), rk.double()) * scaling
    top = torch.maximum(m, logits.amax(-1)) if rk.shape[2] else m
    p = torch.exp(logits - top[..., None])
    tot = s * torch.exp(m - top) + p.sum(-1)
    out = acc * torch.exp(m - top)[..., None] + torch.einsum("bhgn,bhnd->bhgd", p, rv.double())
    return out / tot[..., None]


@pytest.mark.parametrize("bits,d,g,with_gid,dtype,variant", [
    (2, 64, 1, False, torch.float32, "planes"),
    (4, 128, 4, True, torch.float32, "interleaved"),
    (2, 128, 3, True, torch.bfloat16, "planes"),
    (4, 64, 4, False, torch.float16, "interleaved"),
    (2, 64, 3, True, torch.float32, "planes_fma"),
])
def test_fused_residual_output_equals_reference(kt, bits, d, g, with_gid, dtype, variant):
    """decode_attend (quantised part + full-precision residual in the kernels, normalised output in the query's
    dtype) equals float64 attention over the dequantised storage then the residual, for residual lengths 0 ..
    residual + group - 1 (here 0 .. 39: one and several residual blocks), the residual a strided view (a window of
    a larger buffer, values with a non-unit last stride: copied)."""
    gen = torch.Generator().manual_seed(bits + d + g)
    b, h, nq, gs = 2, 2, 45, 32
    st = _random_storage(gen, bits, d, g, with_gid, dtype, b, h, nq)
    ref_state = _state_reference(*st, bits, gs, 0.125)
    kbuf = torch.randn(b, h, 48, d, generator=gen).to(dtype)
    vbuf = torch.randn(b, h, d, 48, generator=gen).to(dtype)
    for r, block_r in ((0, 16), (1, 16), (16, 16), (39, 16), (39, 4)):  # 39 over 3 or 10 residual blocks
        rk, rv = kbuf[:, :, 5:5 + r], vbuf[:, :, :, 2:2 + r].transpose(2, 3)  # [B, H, r, D] views
        out = kt.decode_attend(*st, rk, rv, bits, gs, 0.125, splits=2,
                               config=KiviKernelConfig(variant=variant, block_r=block_r))
        assert out.dtype == dtype and out.shape == (b, h, g, d)
        ref = _with_residual(ref_state, st[0], rk, rv, 0.125)
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # + the output's rounding to half precision
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol, msg=f"residual length {r}")


def test_launch_plan_is_reused_for_the_same_storage_only(kt):
    """A caller's ``plan`` keeps the launch arguments while the same storage tensors come back (a layer between two
    flushes) and is rebuilt for new ones (after a flush: other shapes/strides); the outputs stay exact."""
    gen = torch.Generator().manual_seed(7)
    st = _random_storage(gen, 2, 64, 2, False, torch.float32, 1, 2, 40)
    rk, rv = torch.randn(1, 2, 3, 64, generator=gen), torch.randn(1, 2, 3, 64, generator=gen)
    plan: dict = {}
    first = kt.decode_attend(*st, rk, rv, 2, 32, 0.125, plan=plan)
    launch = plan["launch"]
    again = kt.decode_attend(*st, rk, rv, 2, 32, 0.125, plan=plan)
    assert plan["launch"] is launch
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    longer = _random_storage(gen, 2, 64, 2, False, torch.float32, 1, 2, 72)
    out = kt.decode_attend(*longer, rk, rv, 2, 32, 0.125, plan=plan)
    assert plan["launch"] is not launch and plan["launch"][2][0] == 72  # nq of the new storage
    ref = _with_residual(_state_reference(*longer, 2, 32, 0.125), longer[0], rk, rv, 0.125)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_variant_choice(kt):
    assert kt.choose_variant(128, 128, 2, 32, "auto") == "planes"
    assert kt.choose_variant(16, 16, 2, 8, "auto") == "interleaved"  # 4 bytes of codes: no tl.dot per plane
    assert kt.choose_variant(128, 128, 2, 6, "planes") == "interleaved"  # group not a multiple of 4 channels
    assert kt.choose_variant(128, 128, 4, 32, "interleaved") == "interleaved"
    assert kt.choose_variant(16, 16, 2, 8, "planes_fma") == "planes_fma"
    assert kt.choose_variant(128, 128, 2, 6, "planes_fma") == "interleaved"
    with pytest.raises(ValueError, match="variant='fast' is out of range"):
        kt.choose_variant(128, 128, 2, 32, "fast")


def test_choose_splits_fills_the_machine_with_whole_blocks(kt):
    assert kt.choose_splits(3968, 8, 132, 64) == (62, 64)  # batch 1, 8 KV heads: one block per split
    assert kt.choose_splits(3968, 256, 132, 64) == (3, 1344)  # batch 32: 768 programs
    assert kt.choose_splits(10, 4096, 132, 64) == (1, 64)
    assert kt.choose_splits(3968, 512, 132, 64) == (2, 1984)  # batch 64: 1024 programs
    assert kt.choose_splits(3968, 512, 132, 64, programs_per_sm=8) == (3, 1344)


def _kivi_layer(make_model, make_ids, bits: int, head_dim: int, heads: int, kv_heads: int, evict: bool):
    """A KIVI layer (group 32, residual 16) filled by a 200-token prompt of a tiny Llama with the given head layout;
    with ``evict``, a decode-time H2O-like eviction that drops quantised tokens (so the layer holds group ids)."""
    model = make_model("llama", layers=2, hidden_size=32 * heads, head_dim=head_dim, num_attention_heads=heads,
                       num_key_value_heads=kv_heads)
    cache = squeezekv.make_cache(model, "h2o" if evict else "window", 4096, channel="kivi",
                                 channel_params={"bits": bits, "group_size": 32, "residual": 16, "kernel": "triton"})
    model(make_ids(2, 200), cache=cache)
    layer = cache.layers[1]
    if evict:
        g = torch.Generator().manual_seed(3)
        layer.scores = torch.rand(layer.scores.shape, generator=g)
        layer.compress(150)
        assert layer.kgid is not None
    else:
        assert layer.kgid is None
    assert layer.nq > 64 and layer.nq % 64 != 0
    return layer


@pytest.mark.parametrize("bits,head_dim,heads,kv_heads,evict", [
    (2, 64, 2, 2, False), (2, 128, 4, 1, True), (4, 64, 3, 1, True), (4, 128, 2, 2, False),
])
def test_layer_state_and_output_equal_the_torch_path(kt, make_model, make_ids, bits, head_dim, heads, kv_heads, evict):
    layer = _kivi_layer(make_model, make_ids, bits, head_dim, heads, kv_heads, evict)
    q = torch.randn(2, heads, 1, head_dim, generator=torch.Generator().manual_seed(5))
    qg = q.reshape(2, kv_heads, heads // kv_heads, 1, head_dim)
    scaling = head_dim ** -0.5
    got = layer._quantised_state(qg, None, scaling)
    ref = QuantizedLayer._quantised_state(layer, qg, None, scaling)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    out = layer.attend(q, None, None, None, scaling)
    layer.kernel = "torch"
    torch.testing.assert_close(out, layer.attend(q, None, None, None, scaling), atol=1e-6, rtol=1e-5)


def _teacher_forced(model, cache, ids: torch.Tensor) -> list[torch.Tensor]:
    out = [model(ids[:, :PROMPT], cache=cache).logits[:, -1]]
    for t in range(PROMPT, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], cache=cache).logits[:, -1])
    return out


@pytest.mark.parametrize("policy,budget", [("window", 4096), ("h2o", 30)])
def test_tiny_model_decode_with_the_kernel_equals_the_torch_path(kt, make_model, make_ids, monkeypatch, policy,
                                                                   budget):
    """Teacher-forced decoding of a tiny Llama (head dim 16, group 8): kernel forced vs reference path give the same
    logits; H2O evicts quantised tokens while decoding, so the kernel also reads group ids. The H2O case runs a
    non-default kernel config (given as a dict in the channel parameters), which reaches every kernel call."""
    calls = []
    real = kt.decode_attend
    monkeypatch.setattr(kt, "decode_attend",
                        lambda *a, **k: calls.append((a[7] is not None, k["config"])) or real(*a, **k))
    monkeypatch.setattr(kt, "decode_state", lambda *a, **k: pytest.fail("a decoding step merges the residual in "
                                                                        "the kernel (decode_attend)"))
    config = {"variant": "interleaved", "block_n": 16, "block_r": 4} if policy == "h2o" else None
    model = make_model("llama")
    ids = make_ids(2, PROMPT + 4)
    logits = {}
    for kernel in ("torch", "triton"):
        cache = squeezekv.make_cache(model, policy, budget, channel="kivi",
                                     channel_params={**KIVI_SMALL, "kernel": kernel, "kernel_config": config})
        logits[kernel] = _teacher_forced(model, cache, ids)
    assert len(calls) == 4 * 4  # every decoding step of every layer went through the kernel
    assert {c for _, c in calls} == {KiviKernelConfig(**(config or {}))}
    if policy == "h2o":
        assert any(gid for gid, _ in calls)  # some steps read per-token group ids
    for a, b in zip(logits["triton"], logits["torch"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_auto_keeps_the_torch_path_on_cpu_and_triton_needs_a_device(kt, make_model, make_ids, monkeypatch):
    for name in ("decode_state", "decode_attend"):
        monkeypatch.setattr(kt, name, lambda *a, **k: pytest.fail("auto must not use the kernel on CPU"))
    model = make_model("llama")
    ids = make_ids(1, PROMPT + 1)
    cache = squeezekv.make_cache(model, "window", 4096, channel="kivi", channel_params=KIVI_SMALL)
    _teacher_forced(model, cache, ids)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU without the interpreter: the kernel cannot run
    cache = squeezekv.make_cache(model, "window", 4096, channel="kivi", channel_params={**KIVI_SMALL,
                                                                                       "kernel": "triton"})
    model(ids[:, :PROMPT], cache=cache)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        model(ids[:, PROMPT:], cache=cache)


@pytest.mark.parametrize("method,params,match", [
    ("kivi", {"variant": "fast"}, "variant='fast' is out of range"),
    ("kivi", {"block_n": 24}, "block_n=24 is out of range: must be a power of two >= 16"),
    ("kivi", {"num_warps": 3}, "num_warps=3 is out of range"),
    ("kivi", {"programs_per_sm": 0}, "programs_per_sm=0 is out of range"),
    ("kivi", {"block_r": 6}, "block_r=6 is out of range"),
    ("kivi", {"BLOCK_N": 32}, r"keys \['BLOCK_N'\] are unknown"),
    ("coupled", {"block_n": 8}, "block_n=8 is out of range"),
    ("coupled", {"num_stages": 0}, "num_stages=0 is out of range"),
])
def test_kernel_config_is_validated(method, params, match):
    """A method's ``kernel_config`` (a dict of the config's fields, as a JSON suite gives it) is checked at once."""
    with pytest.raises(ValueError, match=match):
        squeezekv.registry.make_channel(method, kernel_config=params)
    with pytest.raises(TypeError, match="must be a KiviKernelConfig or a dict"):
        squeezekv.registry.make_channel("kivi", kernel_config=CoupledKernelConfig())


def test_kernel_config_defaults_and_choices():
    """Without arguments the configs are the defaults the kernels run with; they are frozen and hashable (the
    launch cache keys on them); ``block_n`` None means 64 tokens for the interleaved, 32 for the planes variants."""
    method = squeezekv.registry.make_channel("kivi", kernel_config=KiviKernelConfig(block_n=32))
    assert method.kernel_config == {**dataclasses.asdict(KiviKernelConfig()), "block_n": 32}  # plain data
    assert kernels.kernel_config(KiviKernelConfig, method.kernel_config, "kivi") == KiviKernelConfig(block_n=32)
    assert squeezekv.registry.make_channel("kivi").kernel_config == dataclasses.asdict(KiviKernelConfig())
    cfg = KiviKernelConfig()
    assert (cfg.block_n_for("interleaved"), cfg.block_n_for("planes"), cfg.block_n_for("planes_fma")) == (64, 32, 32)
    assert KiviKernelConfig(block_n=128).block_n_for("planes") == 128
    with pytest.raises(AttributeError):
        cfg.block_n = 16  # type: ignore[misc]
    assert len({cfg, KiviKernelConfig(), KiviKernelConfig(variant="planes")}) == 2
    cq = CoupledKernelConfig()
    assert (cq.stages_for(127), cq.stages_for(128), CoupledKernelConfig(num_stages=3).stages_for(1000)) == (None, 1, 3)


def test_kernel_parameter_is_validated(make_model, monkeypatch):
    with pytest.raises(ValueError, match="kernel='fast' is out of range"):
        squeezekv.registry.make_channel("kivi", kernel="fast")
    monkeypatch.setattr(kernels, "kernel_module", lambda name: None)  # as on a machine without triton
    with pytest.raises(ValueError, match="needs the triton package"):
        squeezekv.make_cache(make_model("llama"), "window", 64, channel="kivi", channel_params={"kernel": "triton"})


# -- on a CUDA device (compiled kernels, tensor-core products): pytest -m gpu tests/test_kivi_triton.py ----------------
@pytest.fixture(scope="module")
def kt_gpu():
    """``squeezekv.channel.kivi_triton`` compiled for the GPU."""
    return compiled_module("squeezekv.channel.kivi_triton")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["interleaved", "planes", "planes_fma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,d,g,with_gid", [(2, 128, 4, False), (2, 128, 4, True), (4, 128, 1, False),
                                               (4, 64, 8, True), (2, 96, 3, False)])
def test_gpu_kernel_state_equals_dequantised_reference(kt_gpu, bits, d, g, with_gid, dtype, variant):
    gen = torch.Generator().manual_seed(bits * d + g)
    b, h, nq, gs = 3, 8, 1000, 32
    cpu = _random_storage(gen, bits, d, g, with_gid, dtype, b, h, nq)
    dev = [None if t is None else t.cuda() for t in cpu]
    rm, rs, racc = _state_reference(*cpu, bits, gs, 0.125)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for splits, block_n in ((None, None), (1, 32), (7, 64)):
        config = KiviKernelConfig(variant=variant, block_n=block_n)
        m, s, acc = (t.double().cpu() for t in kt_gpu.decode_state(*dev, bits, gs, 0.125, splits=splits,
                                                                   config=config))
        torch.testing.assert_close(m, rm, atol=tol * 4, rtol=tol)
        torch.testing.assert_close(acc / s[..., None], racc / rs[..., None], atol=tol * 4, rtol=tol)
    kbuf = torch.randn(b, h, 200, d, generator=gen).to(dtype)
    vbuf = torch.randn(b, h, d, 200, generator=gen).to(dtype)
    kbuf_dev, vbuf_dev = kbuf.cuda(), vbuf.cuda()
    for r in (0, 1, 128, 159):  # residual lengths up to residual + group - 1 (defaults 128, 32)
        rk, rv = kbuf[:, :, 7:7 + r], vbuf[:, :, :, 3:3 + r].transpose(2, 3)
        rk_dev, rv_dev = kbuf_dev[:, :, 7:7 + r], vbuf_dev[:, :, :, 3:3 + r].transpose(2, 3)  # strided views
        ref = _with_residual((rm, rs, racc), cpu[0], rk, rv, 0.125)
        out = kt_gpu.decode_attend(*dev, rk_dev, rv_dev, bits, gs, 0.125, config=KiviKernelConfig(variant=variant))
        torch.testing.assert_close(out.double().cpu(), ref, atol=tol * 4, rtol=tol, msg=f"residual length {r}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["interleaved", "planes", "planes_fma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_gpu_fused_residual_attend_equals_the_torch_path(kt_gpu, make_model, make_ids, dtype, variant):
    """KIVILayer.attend with the kernel (quantised part and residual fused, output in the query's dtype) against the
    PyTorch reference path (kernel state + torch residual merge, and kernel='torch'), decoding step by step so the
    residual runs through 16..47 tokens, with and without group ids."""
    model = make_model("llama", layers=2, hidden_size=256, head_dim=128, num_attention_heads=4,
                       num_key_value_heads=1).to("cuda", dtype)
    for policy in ("window", "h2o"):
        cache = squeezekv.make_cache(model, policy, 4096, channel="kivi",
                                     channel_params={"bits": 2, "group_size": 32, "residual": 16, "kernel": "triton",
                                                     "kernel_config": {"variant": variant}})
        ids = make_ids(2, 260).cuda()
        model(ids[:, :200], cache=cache)
        layer = cache.layers[1]
        if policy == "h2o":  # evict quantised tokens: group ids
            layer.scores = torch.rand(layer.scores.shape, device="cuda")
            layer.compress(150)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for t in range(200, 240):
            model(ids[:, t:t + 1], cache=cache)
            q = torch.randn(2, 4, 1, 128, device="cuda", generator=gen).to(dtype)
            layer.kernel = "triton"
            out = layer.attend(q, None, None, None, 128 ** -0.5)
            assert out.dtype == dtype
            ref_kernel_state = QuantizedLayer.attend(layer, q, None, None, None, 128 ** -0.5)
            layer.kernel = "torch"
            ref = layer.attend(q, None, None, None, 128 ** -0.5)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out.float(), ref_kernel_state.float(), atol=tol, rtol=tol)
            torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
        assert (layer.kgid is not None) == (policy == "h2o")


@pytest.mark.gpu
def test_gpu_tiny_model_decode_with_the_kernel_equals_the_torch_path(kt_gpu, make_model, make_ids):
    model = make_model("llama").cuda()
    ids = make_ids(2, PROMPT + 6).cuda()
    logits = {}
    for kernel in ("torch", "triton"):
        cache = squeezekv.make_cache(model, "h2o", 30, channel="kivi", channel_params={**KIVI_SMALL, "kernel": kernel})
        logits[kernel] = _teacher_forced(model, cache, ids)
    for a, b in zip(logits["triton"], logits["torch"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_auto_falls_back_for_good_when_the_kernel_fails(kt, make_model, make_ids, monkeypatch):
    """A kernel that fails (e.g. does not compile for the GPU) under kernel='auto' (made to try it on CPU here): one
    warning, then the reference path for good (same logits as kernel='torch'); kernel='triton' raises the error."""
    def boom(*a, **k):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(kt, "decode_state", boom)
    monkeypatch.setattr(kt, "decode_attend", boom)
    monkeypatch.setattr(kernels, "FAILED", {})
    monkeypatch.setattr(kernels, "auto_uses_kernel", lambda device: True)
    model = make_model("llama")
    ids = make_ids(1, PROMPT + 3)
    logits = {}
    for kernel in ("torch", "auto"):
        cache = squeezekv.make_cache(model, "window", 4096, channel="kivi",
                                     channel_params={**KIVI_SMALL, "kernel": kernel})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logits[kernel] = _teacher_forced(model, cache, ids)
        assert len([w for w in caught if "no kernel for this GPU" in str(w.message)]) == (kernel == "auto")
    assert kernels.FAILED == {"kivi": "RuntimeError: no kernel for this GPU"}
    for a, b in zip(logits["auto"], logits["torch"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    cache = squeezekv.make_cache(model, "window", 4096, channel="kivi", channel_params={**KIVI_SMALL,
                                                                                       "kernel": "triton"})
    model(ids[:, :PROMPT], cache=cache)
    with pytest.raises(RuntimeError, match="no kernel for this GPU"):
        model(ids[:, PROMPT:PROMPT + 1], cache=cache)
