"""The fused Coupled Quantization decode kernel (squeezekv.channel.coupled_triton) against references.

The kernel tests run Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before the kernel module is imported; in a
fresh process when this one already imported triton without it) and are skipped when triton is not installed; the
``kernel`` parameter's validation runs everywhere. Codebooks are random (speed and exactness do not depend on them)."""

from __future__ import annotations

import warnings

import pytest
import torch

import squeezekv
from squeezekv.channel import coupled as cq
from squeezekv.channel import kernels
from squeezekv.channel.kernels import CoupledKernelConfig
from squeezekv.channel.packing import pack, unpack
from squeezekv.channel.quantized import QuantizedLayer
from triton_kernels import compiled_module, interpreter_module, run_in_fresh_process

PROMPT = 40


@pytest.fixture(scope="module")
def ct():
    """``squeezekv.channel.coupled_triton`` imported with the interpreter on (dropped again afterwards)."""
    yield from interpreter_module("squeezekv.channel.coupled_triton")


def test_kernel_tests_in_a_fresh_process():
    """When this process imported triton without the interpreter, run the kernel tests in a fresh one."""
    run_in_fresh_process(__file__)


def _state_reference(q, kc, vc, kb, vb, scaling):
    """(max, sum, acc) from keys/values looked up explicitly in the codebooks, float64."""
    h, ng, k, c = kb.shape
    width = k.bit_length() - 1

    def decode(codes, book):
        idx = unpack(codes, width).long()  # [B, H, n, groups]
        b, _, n, groups = idx.shape
        heads = torch.arange(h).view(1, h, 1, 1)
        return book.double()[heads, torch.arange(groups).view(1, 1, 1, groups), idx].reshape(b, h, n, groups * c)

    keys, values = decode(kc, kb), decode(vc, vb)
    logits = torch.einsum("bhgd,bhnd->bhgn", q.double(), keys) * scaling
    m = logits.amax(-1)
    p = torch.exp(logits - m[..., None])
    return m, p.sum(-1), torch.einsum("bhgn,bhnd->bhgd", p, values)


def _random_storage(gen, b, h, nq, d, g, bits, c, dtype):
    width = bits * c
    k = 1 << width
    kb, vb = torch.randn(2, h, d // c, k, c, generator=gen)
    codes = torch.randint(0, k, (2, b, h, nq, d // c), generator=gen)
    q = torch.randn(b, h, g, d, generator=gen).to(dtype)
    return q, pack(codes[0], width), pack(codes[1], width), kb, vb


@pytest.mark.parametrize("bits,c,d,g,splits,block_n,dtype,vector", [
    (1, 8, 64, 1, 1, 32, torch.float32, True),  # CQ-8c8b: one byte per 8 channels
    (1, 8, 64, 1, 1, 32, torch.float32, False),  # channel-by-channel gathers
    (2, 4, 128, 4, 3, 16, torch.float32, True),  # CQ-4c8b
    (2, 4, 128, 4, 3, 16, torch.float32, False),
    (1, 8, 128, 4, None, 32, torch.float32, True),
    (2, 4, 64, 1, 19, 16, torch.float32, True),  # more splits than the merge reads at once (nq 300 here)
    (1, 4, 64, 2, 2, 16, torch.float32, True),  # 4-bit codes: two groups per byte
    (1, 4, 64, 2, 2, 16, torch.float32, False),
    (2, 2, 64, 3, 2, 32, torch.float32, True),  # same, G = 3 (query heads padded to 16 rows)
    (2, 4, 64, 4, 4, 16, torch.bfloat16, True),
    (1, 8, 128, 1, 2, 16, torch.float16, False),
])
def test_kernel_state_equals_codebook_reference(ct, bits, c, d, g, splits, block_n, dtype, vector):
    """Random codes and codebooks (nq not a multiple of the block, several splits): the kernel's (max, sum, acc)
    equals attention over keys/values looked up in the codebooks, in float64."""
    gen = torch.Generator().manual_seed(bits * d + g * 7 + c)
    b, h, nq = 2, 2, (300 if splits == 19 else 77)
    q, kc, vc, kb, vb = _random_storage(gen, b, h, nq, d, g, bits, c, dtype)
    m, s, acc = ct.decode_state(q, kc, vc, kb, vb, 0.125, splits=splits,
                                config=CoupledKernelConfig(block_n=block_n, vector=vector))
    rm, rs, racc = _state_reference(q, kc, vc, kb, vb, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # half precision: keys/values/weights rounded before products
    torch.testing.assert_close(m.double(), rm, atol=tol * 4, rtol=tol)
    torch.testing.assert_close((acc / s[..., None]).double(), racc / rs[..., None], atol=tol * 4, rtol=tol)
    torch.testing.assert_close(s.double() * torch.exp(m.double() - rm), rs, atol=tol, rtol=tol * 4)


def test_choose_splits_and_shape_checks(ct):
    assert ct.choose_splits(4096, 8, 132, CoupledKernelConfig(block_n=32)) == (64, 64)  # batch 1, 8 KV heads
    assert ct.choose_splits(10, 4096, 132) == (1, 32)  # the default config: 32 tokens per block
    assert ct.choose_splits(4096, 8, 132, CoupledKernelConfig(block_n=64, programs_per_sm=1)) == (16, 256)
    gen = torch.Generator().manual_seed(0)
    q, kc, vc, kb, vb = _random_storage(gen, 1, 2, 10, 64, 2, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        ct.decode_state(q, kc, vc, kb[:1], vb, 0.125)
    with pytest.raises(ValueError, match="at least one quantised position"):
        ct.decode_state(q, kc[:, :, :0], vc[:, :, :0], kb, vb, 0.125)


def _books_file(model, tmp_path, bits: int, channels: int) -> str:
    """A calibration file of random codebooks of the model's shape (set through the method's API)."""
    cfg = model.config
    h, d = cfg.num_key_value_heads, cfg.head_dim
    k = 1 << (bits * channels)
    gen = torch.Generator().manual_seed(bits * 10 + channels)
    method = cq.CoupledQuant(bits=bits, channels=channels)
    method.set_codebooks({i: tuple(torch.randn(2, h, d // channels, k, channels, generator=gen))
                          for i in range(cfg.num_hidden_layers)})
    path = tmp_path / f"cq{bits}_{channels}.pt"
    method.save(path)
    return str(path)


@pytest.mark.parametrize("bits,head_dim,heads,kv_heads,evict", [
    (1, 64, 2, 2, False), (2, 128, 4, 1, True), (2, 64, 4, 1, False), (1, 128, 2, 2, True),
])
def test_layer_state_and_output_equal_the_torch_path(ct, make_model, make_ids, tmp_path, bits, head_dim, heads,
                                                     kv_heads, evict):
    """A CQ layer of a tiny Llama with the given head layout, filled by a 150-token prompt (with ``evict``, an
    H2O-like eviction of quantised tokens after it): kernel state and attention output equal the torch path's."""
    model = make_model("llama", layers=2, hidden_size=32 * heads, head_dim=head_dim, num_attention_heads=heads,
                       num_key_value_heads=kv_heads)
    params = {"bits": bits, "residual": 5, "calibration": _books_file(model, tmp_path, bits, 8 // bits),
              "kernel": "triton"}
    cache = squeezekv.make_cache(model, "h2o" if evict else "window", 4096, channel="coupled", channel_params=params)
    model(make_ids(2, 150), cache=cache)
    layer = cache.layers[1]
    if evict:
        layer.scores = torch.rand(layer.scores.shape, generator=torch.Generator().manual_seed(3))
        layer.compress(110)
    assert layer.nq > 64
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


@pytest.mark.parametrize("bits,policy,budget", [(1, "window", 4096), (2, "h2o", 30)])
def test_tiny_model_decode_with_the_kernel_equals_the_torch_path(ct, make_model, make_ids, monkeypatch, tmp_path,
                                                                   bits, policy, budget):
    """Teacher-forced decoding of a tiny Llama (head dim 16): kernel forced vs reference path give the same logits,
    and every decoding step of every layer went through the kernel (H2O also evicts quantised tokens)."""
    calls = []
    real = ct.decode_state
    monkeypatch.setattr(ct, "decode_state", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = make_model("llama")
    ids = make_ids(2, PROMPT + 5)
    path = _books_file(model, tmp_path, bits, 8 // bits)
    logits = {}
    for kernel in ("torch", "triton"):
        cache = squeezekv.make_cache(model, policy, budget, channel="coupled",
                                     channel_params={"bits": bits, "residual": 3, "calibration": path,
                                                     "kernel": kernel})
        logits[kernel] = _teacher_forced(model, cache, ids)
    assert len(calls) == 5 * 4
    for a, b in zip(logits["triton"], logits["torch"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_auto_keeps_the_torch_path_on_cpu_and_triton_needs_a_device(ct, make_model, make_ids, monkeypatch,
                                                                    tmp_path):
    monkeypatch.setattr(ct, "decode_state", lambda *a, **k: pytest.fail("auto must not use the kernel on CPU"))
    model = make_model("llama")
    ids = make_ids(1, PROMPT + 1)
    params = {"bits": 2, "calibration": _books_file(model, tmp_path, 2, 4)}
    cache = squeezekv.make_cache(model, "window", 4096, channel="coupled", channel_params=params)
    _teacher_forced(model, cache, ids)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU without the interpreter: the kernel cannot run
    cache = squeezekv.make_cache(model, "window", 4096, channel="coupled", channel_params={**params,
                                                                                          "kernel": "triton"})
    model(ids[:, :PROMPT], cache=cache)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        model(ids[:, PROMPT:], cache=cache)


def test_auto_falls_back_for_good_when_the_kernel_fails(ct, make_model, make_ids, monkeypatch, tmp_path):
    """A kernel that fails under kernel='auto' (made to try it on CPU here): one warning, then the reference path
    for good (same logits as kernel='torch'); kernel='triton' raises the error."""
    def boom(*a, **k):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(ct, "decode_state", boom)
    monkeypatch.setattr(kernels, "FAILED", {})
    monkeypatch.setattr(kernels, "auto_uses_kernel", lambda device: True)
    model = make_model("llama")
    ids = make_ids(1, PROMPT + 3)
    params = {"bits": 1, "calibration": _books_file(model, tmp_path, 1, 8)}
    logits = {}
    for kernel in ("torch", "auto"):
        cache = squeezekv.make_cache(model, "window", 4096, channel="coupled",
                                     channel_params={**params, "kernel": kernel})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logits[kernel] = _teacher_forced(model, cache, ids)
        assert len([w for w in caught if "no kernel for this GPU" in str(w.message)]) == (kernel == "auto")
    assert kernels.FAILED == {"coupled": "RuntimeError: no kernel for this GPU"}
    for a, b in zip(logits["auto"], logits["torch"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    cache = squeezekv.make_cache(model, "window", 4096, channel="coupled", channel_params={**params,
                                                                                          "kernel": "triton"})
    model(ids[:, :PROMPT], cache=cache)
    with pytest.raises(RuntimeError, match="no kernel for this GPU"):
        model(ids[:, PROMPT:PROMPT + 1], cache=cache)


def test_kernel_parameter_is_validated(make_model, monkeypatch):
    with pytest.raises(ValueError, match="kernel='fast' is out of range"):
        squeezekv.registry.make_channel("coupled", kernel="fast")
    monkeypatch.setattr(kernels, "kernel_module", lambda name: None)  # as on a machine without triton
    with pytest.raises(ValueError, match="needs the triton package"):
        squeezekv.registry.make_channel("coupled", kernel="triton").make_layer(None, 0)


@pytest.mark.parametrize("dtype,g,d,c,w,block_n,vector,stages", [
    ("bf16", 4, 128, 4, 8, 32, True, None),  # the 8B shape, CQ-4c8b
    ("bf16", 4, 128, 8, 8, 64, False, 1),  # CQ-8c8b, channel-by-channel gathers
    ("fp32", 3, 64, 2, 4, 16, True, 2),  # IEEE float32 products, 4-bit codes
])
def test_kernel_compiles_for_sm90(dtype, g, d, c, w, block_n, vector, stages):
    """The split kernel compiles to a cubin for an H100 (sm_90) without a GPU (Triton's bundled ptxas): catches what
    the interpreter does not check (layouts, vector widths, shared memory)."""
    fn = compiled_module("squeezekv.channel.coupled_triton", need_gpu=False)._split_kernel
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    consts = dict(G=g, D=d, DV=d, C=c, W=w, BLOCK_G=16, BLOCK_D=d, BLOCK_DV=d, BLOCK_N=block_n,
                  PRECISION="ieee" if dtype == "fp32" else None, UPCAST=False, VEC=vector)
    sig = {n: "constexpr" if n in consts else "*" + dtype if n in ("Q", "KB", "VB") else "*u8" if n in ("KC", "VC")
           else "*fp32" if n in ("MO", "LO", "AO") else "fp32" if n == "scaling" else "i32" for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()}, attrs=attrs)
    options = {"num_warps": 4} | ({} if stages is None else {"num_stages": stages})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except FileNotFoundError as e:  # no ptxas
        pytest.skip(f"cannot compile for CUDA here: {e}")
    ptx = compiled.asm["ptx"]
    assert "cp.async" in ptx or "ld.global" in ptx
    assert compiled.metadata.shared < 100 * 1024


# -- on a CUDA device (compiled kernels, tensor-core products): pytest -m gpu tests/test_coupled_triton.py -------------
@pytest.fixture(scope="module")
def ct_gpu():
    """``squeezekv.channel.coupled_triton`` compiled for the GPU."""
    return compiled_module("squeezekv.channel.coupled_triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,c,d,g", [(1, 8, 128, 4), (2, 4, 128, 4), (2, 4, 64, 8), (1, 4, 128, 1)])
def test_gpu_kernel_state_equals_codebook_reference(ct_gpu, bits, c, d, g, dtype):
    gen = torch.Generator().manual_seed(bits * d + g)
    cpu = _random_storage(gen, 3, 8, 1000, d, g, bits, c, dtype)
    dev = [t.cuda() for t in cpu]
    rm, rs, racc = _state_reference(*cpu, 0.125)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for splits, vector, stages in ((None, True, None), (1, True, 1), (7, False, None), (None, False, 1)):
        m, s, acc = (t.double().cpu() for t in ct_gpu.decode_state(
            *dev, 0.125, splits=splits, config=CoupledKernelConfig(vector=vector, num_stages=stages)))
        torch.testing.assert_close(m, rm, atol=tol * 4, rtol=tol)
        torch.testing.assert_close(acc / s[..., None], racc / rs[..., None], atol=tol * 4, rtol=tol)


@pytest.mark.gpu
def test_gpu_tiny_model_decode_with_the_kernel_equals_the_torch_path(ct_gpu, make_model, make_ids, tmp_path):
    model = make_model("llama").cuda()
    ids = make_ids(2, PROMPT + 6).cuda()
    path = _books_file(model, tmp_path, 2, 4)
    logits = {}
    for kernel in ("torch", "triton"):
        cache = squeezekv.make_cache(model, "h2o", 30, channel="coupled",
                                     channel_params={"bits": 2, "residual": 3, "calibration": path, "kernel": kernel})
        logits[kernel] = _teacher_forced(model, cache, ids)
    for a, b in zip(logits["triton"], logits["torch"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
