"""The decode runtime (squeezekv.runtime): the KV pool's slots and bytes, and batched decoding through the runtime equal
to the eager path (each request prefilled and decoded on its own SqueezeCache with evict_every = chunk)."""

from __future__ import annotations

import pytest
import torch

import squeezekv
from squeezekv.cache import allocated_nbytes
from squeezekv.runtime.pool import KVPool, pool_capacities
from squeezekv.runtime.runtime import DecodeRuntime

CHUNK = 4
BUDGET = 16
PROMPTS = (24, 30, 37)  # different prompt lengths, all longer than the budget
STEPS = 3 * CHUNK  # three compactions for the policies that evict while decoding


def _prefill(model, ids, method, method_params, allocation="uniform"):
    cache = squeezekv.make_cache(model, method, BUDGET, allocation, evict_every=CHUNK,
                                 method_params=method_params(method))
    logits = model(ids, cache=cache).logits[:, -1]  # [1, vocab]
    return cache, logits


def _pool_for(cache, max_seqs, new_tokens=STEPS + 2):
    return KVPool.for_cache(cache, max_seqs, new_tokens)


def _eager_step(model, cache, tok):
    return model(tok.view(1, 1), cache=cache).logits[:, -1]  # [1, vocab]


def _same_state(rt, slot, cache):
    """The slot holds what the eager cache holds: the same kept positions (and scores), every layer."""
    for i, layer in enumerate(cache.layers):
        assert torch.equal(rt.kept_positions(slot, i), layer.token_idx[0]), (i, slot)
        n = layer.physical_length
        order = rt.pool.temporal_order(i, [slot], n)[0][0]  # [H, n]: the entries by position
        keys = rt.pool.keys[i][slot, :, :n].gather(1, order[..., None].expand(-1, -1, layer.keys.shape[-1]))
        torch.testing.assert_close(keys, layer.keys[0], rtol=0, atol=1e-5)
        if rt.pool.scores is not None:  # h2o: accumulated every step; snapkv: the prompt's votes, 0 for new tokens
            scores = rt.pool.scores[i][slot, :, :n].gather(1, order)
            torch.testing.assert_close(scores, layer.scores[0], rtol=0, atol=1e-5)
    assert rt.pool.host_seen[slot] == cache.layers[0].seen == int(rt.pool.seen[slot])


# -- the pool ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_scores,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_pool_bytes_equal_the_formula(with_scores, dtype):
    caps, seqs, h, d = [20, 9, 33], 3, 2, 16
    pool = KVPool(caps, seqs, h, d, dtype=dtype, with_scores=with_scores)
    item = 4 if dtype == torch.float32 else 2
    per_slot = sum(h * c * (2 * d * item + 4 + (4 if with_scores else 0)) for c in caps) + len(caps) * h * 4 + 8
    assert pool.slot_nbytes() == per_slot
    assert pool.nbytes() == (seqs + 1) * per_slot == allocated_nbytes(pool.tensors())


@pytest.mark.parametrize("method,extra", [("window", CHUNK), ("h2o", CHUNK), ("snapkv", 7)])
def test_pool_capacity_is_budget_plus_chunk_or_new_tokens(method, extra, make_model, make_ids, method_params):
    model = make_model("llama")
    cache, _ = _prefill(model, make_ids(1, 30), method, method_params)
    pool = KVPool.for_cache(cache, 2, max_new_tokens=7)
    assert pool.capacities == (BUDGET + extra,) * 4  # snapkv evicts nothing while decoding: room for every new token
    assert (pool.kv_heads, pool.head_dim, pool.dtype, pool.with_scores) == (2, 16, torch.float32, method != "window")
    plan = cache.plan.__class__(budgets=(5, None), base=5, allocation="uniform")
    assert pool_capacities(plan, 3, True, 9, context=40) == [8, 49]
    with pytest.raises(ValueError, match="context"):
        pool_capacities(plan, 3, True, 9)


def test_pool_slots_are_taken_and_released_without_reallocation():
    pool = KVPool([8, 8], 2, 2, 16)
    ptrs = [t.data_ptr() for t in pool.tensors()]
    a, b = pool.acquire(), pool.acquire()
    assert {a, b} == {0, 1} and pool.free_slots() == 0
    with pytest.raises(ValueError, match="all in use"):
        pool.acquire()
    pool.release(a)
    with pytest.raises(ValueError, match="not in use"):
        pool.release(a)
    assert pool.free_slots() == 1 and pool.acquire() == a
    assert [t.data_ptr() for t in pool.tensors()] == ptrs
    with pytest.raises(ValueError, match="capacities"):
        KVPool([8, 0], 2, 2, 16)
    with pytest.raises(ValueError, match="max_seqs"):
        KVPool([8], 0, 2, 16)


@pytest.mark.parametrize("slots", [(0, 1, 2), (3, 1)])
def test_keep_rows_fills_the_holes_and_moves_only_the_entries_past_the_budget(slots):
    """Hole filling: the kept set survives bit for bit (as a set per slot and head), entries below k that were
    kept stay in place, lengths drop to k, other slots and the entries past the new length are not read again."""
    caps, h, d, n, k = [12], 3, 4, 11, 7
    pool = KVPool(caps, 4, h, d, with_scores=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        pool.acquire()
    for t in (pool.keys[0], pool.values[0], pool.scores[0]):
        t.copy_(torch.randn(t.shape, generator=gen))
    pool.positions[0].copy_(torch.randperm(5 * h * 12, generator=gen)[: 5 * h * 12].view(5, h, 12).int())
    pool.host_lengths[0][:] = n
    pool.lengths[0].fill_(n)
    before = [t.clone() for t in (pool.keys[0], pool.values[0], pool.positions[0], pool.scores[0])]
    idx = torch.stack([torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(h)]) for _ in slots])
    pool.keep_rows(0, list(slots), idx)
    for r, s in enumerate(slots):
        assert pool.host_lengths[0][s] == k and torch.equal(pool.lengths[0, s], torch.full((h,), k, dtype=torch.int32))
        for j in range(h):
            want = sorted(idx[r, j].tolist())
            for old, new in zip(before, (pool.keys[0], pool.values[0], pool.positions[0], pool.scores[0])):
                got = new[s, j, :k]
                ref = old[s, j, want]
                # same entries as a set: match them up by their (distinct) positions
                perm = pool.positions[0][s, j, :k].argsort()
                refperm = before[2][s, j, want].argsort()
                assert torch.equal(got[perm], ref[refperm])
            stayed = [e for e in want if e < k]
            assert torch.equal(pool.keys[0][s, j, stayed], before[0][s, j, stayed])  # kept below k: not moved
    for s in set(range(5)) - set(slots):
        assert torch.equal(pool.keys[0][s], before[0][s]) and pool.host_lengths[0][s] == n
    pool.host_lengths[0][0] = 9
    with pytest.raises(ValueError, match="same number"):
        pool.keep_rows(0, [0, 2], idx[:2])


def test_admit_copies_the_request_and_leaves_other_slots_alone(make_model, make_ids, method_params):
    model = make_model("llama")
    cache, _ = _prefill(model, make_ids(1, 30), "h2o", method_params)
    pool = _pool_for(cache, 2)
    other = pool.acquire()
    for t in (*pool.keys, *pool.values):
        t[other].normal_()
    snapshot = [t[other].clone() for t in pool.tensors() if t.dim() > 1 and t.shape[0] == pool.max_seqs + 1]
    slot = pool.acquire()
    pool.admit(slot, cache)
    for i, layer in enumerate(cache.layers):
        n = layer.physical_length
        assert n == BUDGET and pool.host_lengths[i][slot] == n
        assert torch.equal(pool.keys[i][slot, :, :n], layer.keys[0])  # bit for bit
        assert torch.equal(pool.values[i][slot, :, :n], layer.values[0])
        assert torch.equal(pool.positions[i][slot, :, :n], layer.token_idx[0])
        assert torch.equal(pool.scores[i][slot, :, :n], layer.scores[0])
        assert torch.equal(pool.lengths[i, slot], torch.full((2,), n, dtype=torch.int32))
    assert int(pool.seen[slot]) == 30
    after = [t[other] for t in pool.tensors() if t.dim() > 1 and t.shape[0] == pool.max_seqs + 1]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


def test_admit_refuses_what_it_cannot_hold(make_model, make_ids, make_left_padded, method_params):
    model = make_model("llama")
    cache, _ = _prefill(model, make_ids(1, 30), "window", method_params)
    pool = KVPool([BUDGET - 1] * 4, 1, 2, 16)
    slot = pool.acquire()
    with pytest.raises(ValueError, match="capacity"):
        pool.admit(slot, cache)
    pool = _pool_for(cache, 1)
    slot = pool.acquire()
    batch = squeezekv.make_cache(model, "window", BUDGET, "uniform")
    model(make_ids(2, 30), cache=batch)
    with pytest.raises(ValueError, match="batch of 2"):
        pool.admit(slot, batch)
    with pytest.raises(ValueError, match="prefill"):
        pool.admit(slot, squeezekv.make_cache(model, "window", BUDGET, "uniform"))
    kivi = squeezekv.make_cache(model, "window", BUDGET, "uniform", channel="kivi",
                                channel_params={"bits": 2, "group_size": 8, "residual": 8})
    model(make_ids(1, 30), cache=kivi)
    with pytest.raises(ValueError, match="plain SqueezeLayers"):
        pool.admit(slot, kivi)


# -- the runtime equals the eager path -----------------------------------------------------------------------------


@pytest.mark.parametrize("prompts,allocation", [(PROMPTS, "uniform"), ((30, 30, 30), "uniform"),
                                                ((30, 30, 30), "pyramid")],
                         ids=["different-lengths", "same-length", "same-length-pyramid"])
@pytest.mark.parametrize("method", ["window", "streamingllm", "h2o", "snapkv"])
def test_runtime_equals_eager(method, prompts, allocation, make_model, make_ids, method_params):
    """Requests of the same length evict together (one selection and one compaction for every layer of one capacity
    and all the group's slots), of different lengths separately; with per-layer budgets (pyramid) each capacity
    apart; either way each row equals its own eager decoding."""
    model = make_model("llama")
    reqs = [_prefill(model, make_ids(1, n, seed=10 + n + i), method, method_params, allocation)
            for i, n in enumerate(prompts)]
    pool = _pool_for(reqs[0][0], max_seqs=4)
    rt = DecodeRuntime(model, pool, reqs[0][0].policy, CHUNK)
    slots = [rt.join(cache) for cache, _ in reqs]
    for (cache, _), slot in zip(reqs, slots):
        _same_state(rt, slot, cache)
    eager = [logits for _, logits in reqs]
    got = torch.cat(eager)
    compactions = 0
    for _ in range(STEPS):
        toks = got.argmax(-1)  # [3]
        got = rt.step(slots, toks)  # bucket of 4: one padding row on the scratch slot
        for r, (cache, _) in enumerate(reqs):
            assert int(toks[r]) == int(eager[r].argmax(-1))  # same greedy tokens
            eager[r] = _eager_step(model, cache, toks[r])
            torch.testing.assert_close(got[r:r + 1], eager[r], rtol=0, atol=1e-4)
            _same_state(rt, slots[r], cache)
        compactions += method != "snapkv" and rt.pool.host_lengths[0][slots[0]] == pool.capacities[0] - CHUNK
    if allocation == "pyramid":
        assert len(set(pool.capacities)) > 1  # layers of several capacities
    if method == "snapkv":  # nothing evicted while decoding: the slot grows by one per step
        assert rt.pool.host_lengths[0][slots[0]] == reqs[0][0].layers[0].physical_length and compactions == 0
    else:
        assert compactions == 3


def test_requests_join_and_leave_between_steps(make_model, make_ids, method_params):
    """A request joining or leaving changes no other row: each row equals its own eager decoding."""
    model = make_model("llama")
    method = "h2o"
    reqs = [_prefill(model, make_ids(1, n, seed=20 + n), method, method_params) for n in PROMPTS]
    pool = _pool_for(reqs[0][0], max_seqs=3)
    rt = DecodeRuntime(model, pool, "h2o", CHUNK)
    last = {r: logits for r, (_, logits) in enumerate(reqs)}
    active: dict[int, int] = {}  # request -> slot
    schedule = {0: ("join", 0), 1: ("join", 1), 3: ("join", 2), 6: ("leave", 1), 9: ("leave", 0)}
    for step in range(STEPS):
        if step in schedule:
            what, r = schedule[step]
            if what == "join":
                active[r] = rt.join(reqs[r][0])
            else:
                rt.leave(active.pop(r))
        order = sorted(active)
        toks = torch.stack([last[r].argmax(-1)[0] for r in order])
        got = rt.step([active[r] for r in order], toks)
        for i, r in enumerate(order):
            cache = reqs[r][0]
            last[r] = _eager_step(model, cache, toks[i])
            torch.testing.assert_close(got[i:i + 1], last[r], rtol=0, atol=1e-4)
            _same_state(rt, active[r], cache)
    assert sorted(active) == [2] and pool.free_slots() == 2


def test_runtime_refuses_what_it_cannot_do(make_model, make_ids, method_params):
    model = make_model("llama")
    cache, _ = _prefill(model, make_ids(1, 30), "snapkv", method_params)
    pool = _pool_for(cache, 1, new_tokens=1)
    with pytest.raises(ValueError, match="no_such_policy"):
        DecodeRuntime(model, pool, "no_such_policy", CHUNK)
    with pytest.raises(ValueError, match="with_scores"):
        DecodeRuntime(model, KVPool(list(pool.capacities), 1, 2, 16), "h2o", CHUNK)
    with pytest.raises(ValueError, match="chunk"):
        DecodeRuntime(model, pool, "snapkv", 0)
    with pytest.raises(ValueError, match="layers"):
        DecodeRuntime(make_model("llama", layers=2), pool, "snapkv", CHUNK)
    with pytest.raises(ValueError, match="full attention"):
        DecodeRuntime(make_model("mistral"), pool, "snapkv", CHUNK)
    rt = DecodeRuntime(model, pool, cache.policy, CHUNK)
    with pytest.raises(ValueError, match="policy"):
        rt.join(_prefill(model, make_ids(1, 30), "window", method_params)[0])
    slot = rt.join(cache)
    tok = torch.tensor([5])
    rt.step([slot], tok)
    with pytest.raises(ValueError, match="is full"):  # snapkv grows: the pool was built for one new token
        rt.step([slot], tok)
    with pytest.raises(ValueError, match="distinct"):
        rt.step([slot, slot], torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="join"):
        rt.step([0 if slot else 1], tok)


def _graph_or_compiled_equals_eager(method, make_model, make_ids, method_params, device, compile):
    """Each bucket's step (captured as a CUDA graph on CUDA; compiled with torch.compile if ``compile``) equals the
    eager path, over a compaction and a request leaving (buckets 4 then 2)."""
    model = make_model("llama").to(device)
    reqs = [_prefill(model, make_ids(1, n, seed=10 + n).to(device), method, method_params) for n in PROMPTS]
    cache0 = reqs[0][0]
    caps = pool_capacities(cache0.plan, CHUNK, cache0.evicts_while_decoding, STEPS + 2)
    pool = KVPool(caps, 4, kv_heads=2, head_dim=16, device=device, with_scores=cache0.policy.uses_scores)
    rt = DecodeRuntime(model, pool, cache0.policy, CHUNK, compile=compile)
    assert rt.use_graph == (device == "cuda")
    slots = [rt.join(cache) for cache, _ in reqs]
    eager = [logits for _, logits in reqs]
    got = torch.cat(eager)
    for step in range(STEPS):
        live = [0, 1, 2] if step < CHUNK + 1 else [0, 2]  # bucket 4, then bucket 2: two captured graphs
        toks = got.argmax(-1)
        if step == CHUNK + 1:
            rt.leave(slots[1])
            toks = toks[[0, 2]]
        got = rt.step([slots[r] for r in live], toks)
        for i, r in enumerate(live):
            cache = reqs[r][0]
            assert int(toks[i]) == int(eager[r].argmax(-1))
            eager[r] = _eager_step(model, cache, toks[i])
            torch.testing.assert_close(got[i:i + 1], eager[r], rtol=0, atol=1e-4)
            _same_state(rt, slots[r], cache)
    assert sorted(rt._buckets) == [2, 4] and all((b.graph is not None) == rt.use_graph for b in rt._buckets.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("method", ["streamingllm", "h2o", "snapkv"])
def test_cuda_graph_runtime_equals_eager(method, compile, make_model, make_ids, method_params):
    """On the GPU: each bucket's step captured as a CUDA graph (the Triton kernels when triton is installed), compiled
    or not, equals the eager path."""
    _graph_or_compiled_equals_eager(method, make_model, make_ids, method_params, "cuda", compile)


def test_compiled_runtime_equals_eager(make_model, make_ids, method_params):
    """On the CPU: the step compiled with torch.compile (one compilation: the batch dimension is dynamic) equals the
    eager path for H2O (its scores written inside the step) over a compaction and a change of bucket."""
    _graph_or_compiled_equals_eager("h2o", make_model, make_ids, method_params, "cpu", True)


def test_batch_buckets():
    """Powers of two up to 64, then multiples of 64 (large batches are not padded to the next power of two)."""
    from squeezekv.runtime.runtime import DecodeRuntime as R

    assert [R.bucket_size(None, n) for n in (1, 2, 3, 5, 17, 64, 65, 128, 130, 530)] == [
        1, 2, 4, 8, 32, 64, 128, 128, 192, 576]
