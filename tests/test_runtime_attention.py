"""The runtime's decode attention (squeezekv.runtime.decode_attention): the PyTorch reference against SDPA with a
boolean mask, and the Triton split-K kernel against the reference under Triton's CPU interpreter (skipped without
triton; run in a fresh process when this one imported triton compiled)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from squeezekv.runtime.decode_attention import decode_attention, reference_decode_attention
from triton_kernels import interpreter_module, run_in_fresh_process


@pytest.fixture(scope="module")
def dt():
    """``squeezekv.runtime.decode_triton`` imported with the interpreter on (dropped again afterwards)."""
    yield from interpreter_module("squeezekv.runtime.decode_triton")


def test_kernel_tests_in_a_fresh_process():
    run_in_fresh_process(__file__)


def _inputs(gen, b, hq, h, c, d, dtype, rows=None):
    rows = b + 2 if rows is None else rows
    q = torch.randn(b, hq, 1, d, generator=gen).to(dtype)
    k_pool = torch.randn(rows, h, c, d, generator=gen).to(dtype)
    v_pool = torch.randn(rows, h, c, d, generator=gen).to(dtype)
    slots = torch.randperm(rows, generator=gen)[:b]
    lengths = torch.randint(1, c + 1, (b, h), generator=gen, dtype=torch.int32)
    lengths[0, 0] = c  # full
    lengths[-1, -1] = 1  # one entry
    return q, k_pool, v_pool, slots, lengths


def _sdpa(q, k_pool, v_pool, slots, lengths, scale):
    """SDPA over the rows' whole slots with a boolean mask of the filled entries, float64."""
    b, hq, _, d = q.shape
    h, c = k_pool.shape[1], k_pool.shape[2]
    k = k_pool[slots].double().repeat_interleave(hq // h, dim=1)  # [B, Hq, C, D]
    v = v_pool[slots].double().repeat_interleave(hq // h, dim=1)
    mask = (torch.arange(c) < lengths[..., None]).repeat_interleave(hq // h, dim=1)[:, :, None]  # [B, Hq, 1, C]
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask, scale=scale)


def _weights(q, k_pool, slots, lengths, scale):
    """Softmax weights summed over each KV head's query group, [B, H, C], float64."""
    b, hq, _, d = q.shape
    h, c = k_pool.shape[1], k_pool.shape[2]
    logits = torch.einsum("bhgd,bhnd->bhgn", q.double().reshape(b, h, hq // h, d), k_pool[slots].double()) * scale
    logits = logits.masked_fill(~(torch.arange(c) < lengths[..., None])[:, :, None], float("-inf"))
    return logits.softmax(-1).sum(2)


@pytest.mark.parametrize("b,hq,h,c,d", [(3, 4, 2, 37, 16), (1, 8, 8, 5, 32), (4, 6, 2, 130, 24)])
def test_reference_equals_masked_sdpa(b, hq, h, c, d):
    gen = torch.Generator().manual_seed(b * 100 + c)
    q, k_pool, v_pool, slots, lengths = _inputs(gen, b, hq, h, c, d, torch.float32)
    scale = d ** -0.5
    got = reference_decode_attention(q, k_pool, v_pool, slots, lengths, scale)
    torch.testing.assert_close(got.double(), _sdpa(q, k_pool, v_pool, slots, lengths, scale), rtol=0, atol=1e-5)
    # the scores of the rows' slots grow by the weights; other slots are untouched
    scores = torch.rand(k_pool.shape[:3], generator=gen)
    before = scores.clone()
    reference_decode_attention(q, k_pool, v_pool, slots, lengths, scale, scores=scores)
    expect = before.double()
    expect[slots] += _weights(q, k_pool, slots, lengths, scale)
    torch.testing.assert_close(scores.double(), expect, rtol=0, atol=1e-6)


def test_entries_past_the_length_are_not_read():
    gen = torch.Generator().manual_seed(5)
    q, k_pool, v_pool, slots, lengths = _inputs(gen, 2, 4, 2, 20, 16, torch.float32)
    lengths.fill_(7)
    ref = decode_attention(q, k_pool, v_pool, slots, lengths, 0.25)
    k_pool[:, :, 7:] = 1e4
    v_pool[:, :, 7:] = float("nan")
    assert torch.equal(decode_attention(q, k_pool, v_pool, slots, lengths, 0.25), ref)


def test_decode_attention_validates_its_inputs():
    gen = torch.Generator().manual_seed(6)
    q, k_pool, v_pool, slots, lengths = _inputs(gen, 2, 4, 2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        decode_attention(q, k_pool, v_pool, slots, lengths, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="one query per row"):
        decode_attention(q.expand(2, 4, 3, 16), k_pool, v_pool, slots, lengths, 1.0)
    with pytest.raises(ValueError, match="group"):
        decode_attention(q[:, :3], k_pool, v_pool, slots, lengths, 1.0)
    with pytest.raises(ValueError, match="slots"):
        decode_attention(q, k_pool, v_pool, slots.float(), lengths, 1.0)
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(q, k_pool, v_pool, slots, lengths[:, :1], 1.0)
    with pytest.raises(ValueError, match="scores"):
        decode_attention(q, k_pool, v_pool, slots, lengths, 1.0, scores=torch.zeros(3))


@pytest.mark.parametrize("b,hq,h,c,d,dtype,splits,block_n", [
    (3, 4, 2, 37, 16, torch.float32, 1, 16),  # one split: the split kernel writes the output
    (3, 4, 2, 37, 16, torch.float32, 3, 16),  # splits past a row's length do nothing
    (2, 8, 2, 130, 32, torch.float32, None, None),  # default split choice and block, 4 query heads per KV head
    (2, 6, 2, 70, 24, torch.float32, 5, 16),  # head dim and group padded to powers of two
    (1, 2, 1, 290, 16, torch.float32, 19, 16),  # more splits than the merge reads at once
    (3, 4, 2, 50, 32, torch.bfloat16, 2, 16),
    (2, 4, 1, 40, 16, torch.float16, 3, 16),
])
def test_kernel_equals_reference(dt, b, hq, h, c, d, dtype, splits, block_n):
    gen = torch.Generator().manual_seed(c + d)
    q, k_pool, v_pool, slots, lengths = _inputs(gen, b, hq, h, c, d, dtype)
    scale = d ** -0.5
    scores_ref = torch.rand(k_pool.shape[:3], generator=gen)
    scores = scores_ref.clone()
    ref = reference_decode_attention(q, k_pool, v_pool, slots, lengths, scale, scores_ref)
    got = dt.decode_attention(q, k_pool, v_pool, slots, lengths, scale, scores=scores, splits=splits,
                              block_n=block_n)
    assert got.dtype == dtype and got.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=tol)
    torch.testing.assert_close(scores, scores_ref, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_kernel_grid_does_not_depend_on_lengths(dt, monkeypatch):
    """The same launch whatever the lengths (a CUDA graph replays it): the splits follow the capacity only."""
    gen = torch.Generator().manual_seed(9)
    launches = []
    orig = dt._split_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return orig[grid]

    monkeypatch.setattr(dt, "_split_kernel", Spy())
    for fill in (1, 17, 48):
        q, k_pool, v_pool, slots, lengths = _inputs(gen, 1, 4, 2, 48, 16, torch.float32)
        lengths.fill_(fill)
        got = dt.decode_attention(q, k_pool, v_pool, slots, lengths, 0.25, block_n=16)
        torch.testing.assert_close(got, reference_decode_attention(q, k_pool, v_pool, slots, lengths, 0.25),
                                   rtol=0, atol=1e-5)
    assert len(set(launches)) == 1 and launches[0][1] > 1


@pytest.mark.parametrize("method,compile", [("h2o", False), ("h2o", True), ("snapkv", True), ("streamingllm", True)])
def test_runtime_with_the_kernel_equals_eager(dt, method, compile, make_model, make_ids):
    """The decode runtime running the (interpreted) kernels, h2o scores included, equals the eager path; also with
    the step compiled by torch.compile (the kernels are custom operators in the compiled graph; snapkv: the attention
    operator without scores beside the write with scores, the case inductor refused as an optional mutated argument;
    streamingllm: both operators without scores)."""
    import squeezekv
    from squeezekv.runtime.pool import KVPool, pool_capacities
    from squeezekv.runtime.runtime import DecodeRuntime

    chunk, budget = 4, 12
    model = make_model("llama", layers=2)
    reqs = []
    for n in (20, 27):
        cache = squeezekv.make_cache(model, method, budget, "uniform", evict_every=chunk)
        reqs.append([cache, model(make_ids(1, n, seed=n), cache=cache).logits[:, -1]])
    first = reqs[0][0]
    scored = first.policy.uses_scores
    caps = pool_capacities(first.plan, chunk, first.evicts_while_decoding, chunk + 1)
    rt = DecodeRuntime(model, KVPool(caps, 2, 2, 16, with_scores=scored), method, chunk, backend="triton",
                       compile=compile)
    assert rt.resolved_backend == "triton"
    slots = [rt.join(cache) for cache, _ in reqs]
    for _ in range(chunk + 1):  # one compaction
        toks = torch.cat([logits for _, logits in reqs]).argmax(-1)
        got = rt.step(slots, toks)
        for r, req in enumerate(reqs):
            req[1] = model(toks[r].view(1, 1), cache=req[0]).logits[:, -1]
            torch.testing.assert_close(got[r:r + 1], req[1], rtol=0, atol=1e-4)
            for i, layer in enumerate(req[0].layers):
                assert torch.equal(rt.kept_positions(slots[r], i), layer.token_idx[0])
                if scored:  # the pool's entries by position (hole filling leaves them unordered)
                    n = layer.physical_length
                    order = rt.pool.temporal_order(i, [slots[r]], n)[0][0]  # [H, n]
                    torch.testing.assert_close(rt.pool.scores[i][slots[r], :, :n].gather(1, order),
                                               layer.scores[0], rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_kernel_equals_reference(dtype):
    """On the GPU: Llama-3-8B's head layout (32 query heads over 8 KV heads of dim 128), bf16/fp16."""
    from triton_kernels import compiled_module

    dt = compiled_module("squeezekv.runtime.decode_triton")
    gen = torch.Generator().manual_seed(3)
    q, k_pool, v_pool, slots, lengths = (t.cuda() for t in _inputs(gen, 8, 32, 8, 1700, 128, dtype, rows=12))
    scores_ref = torch.rand(k_pool.shape[:3], generator=gen).cuda()
    scores = scores_ref.clone()
    ref = reference_decode_attention(q, k_pool, v_pool, slots, lengths, 128 ** -0.5, scores_ref)
    got = dt.decode_attention(q, k_pool, v_pool, slots, lengths, 128 ** -0.5, scores=scores)
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=2e-2)
    # the reference rounds the logits to the inputs' 16-bit dtype, the kernel accumulates them in float32: the weights
    # (summed over each KV head's 4 query heads) differ by up to 1.5e-3 absolute, 1.0e-3 relative (measured, H200)
    torch.testing.assert_close(scores, scores_ref, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("kernel", ["_split_kernel", "_merge_kernel", "_scores_kernel"])
@pytest.mark.parametrize("dtype,g,d", [("bf16", 4, 128), ("fp16", 8, 64), ("fp32", 1, 128)])
def test_kernels_compile_for_sm90(kernel, dtype, g, d):
    """Each kernel compiles to a cubin for an H100/H200 (sm_90) without a GPU (Triton's bundled ptxas): catches what
    the interpreter does not check (dynamic loop bounds, layouts, shared memory)."""
    from triton_kernels import compiled_module

    fn = getattr(compiled_module("squeezekv.runtime.decode_triton", need_gpu=False), kernel)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    consts = dict(G=g, D=d, BLOCK_G=max(16, g), BLOCK_D=d, BLOCK_N=32 if dtype == "fp32" else 64, BLOCK_S=16,
                  PRECISION="ieee" if dtype == "fp32" else None, UPCAST=False, SINGLE=False)
    consts = {n: v for n, v in consts.items() if n in names}
    ptr = {"Q": dtype, "K": dtype, "V": dtype, "OUT": dtype, "SLOTS": "i64", "LENS": "i32"}
    sig = {n: "constexpr" if n in consts else "*" + ptr[n] if n in ptr
           else "*fp32" if n in ("MO", "LO", "AO", "M", "L", "SC", "LG") else "fp32" if n == "scale" else "i32"
           for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()}, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except FileNotFoundError as e:  # no ptxas
        pytest.skip(f"cannot compile for CUDA here: {e}")
    assert "ld.global" in compiled.asm["ptx"] or "cp.async" in compiled.asm["ptx"]
    assert compiled.metadata.shared < 100 * 1024


@pytest.mark.parametrize("with_scores,dtype,d", [(True, torch.float32, 16), (False, torch.bfloat16, 24)])
def test_pool_write_kernel_equals_indexing(dt, with_scores, dtype, d):
    """The one-launch pool write (KVPool.write, backend 'triton', interpreted) leaves every pool tensor bit for bit as
    the indexing path does and returns the same lengths, for new keys/values given as transposed views."""
    from squeezekv.runtime.pool import KVPool

    gen = torch.Generator().manual_seed(d)
    pools = [KVPool([9, 6], 5, 2, d, dtype=dtype, with_scores=with_scores) for _ in range(2)]
    for pool in pools:
        for t in pool.tensors():
            t.copy_(torch.randint(0, 50, t.shape, generator=torch.Generator().manual_seed(t.numel())).to(t.dtype))
        pool.lengths[0].copy_(torch.tensor([[0, 3], [8, 5], [2, 2], [7, 0], [4, 1], [0, 0]]))
        pool.lengths[1].copy_(torch.tensor([[5, 0], [1, 2], [3, 3], [0, 5], [2, 4], [0, 0]]))
    slots = torch.tensor([3, 0, 1, 5])  # the last row: the scratch slot
    for layer in (0, 1):
        k_new = torch.randn(4, 1, 2, d, generator=gen).to(dtype).transpose(1, 2)  # [B, H, 1, D] as a view
        v_new = torch.randn(4, 1, 2, d, generator=gen).to(dtype).transpose(1, 2)
        ref = pools[0].write(layer, slots, k_new, v_new, backend="torch")
        got = pools[1].write(layer, slots, k_new, v_new, backend="triton")
        assert got.dtype == torch.int32 and torch.equal(got, ref)
    for a, b in zip(pools[0].tensors(), pools[1].tensors()):
        assert torch.equal(a, b)
