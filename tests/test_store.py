"""The KV store (CachedAttention / AttentionStore, arXiv 2403.19708): reuse is exact from every tier and after
demotion/promotion, for the full cache and compressed caches; truncation by re-rotation; eviction order and byte
accounting on a fake clock; a corrupt disk entry is detected and recomputed."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import DynamicCache

import squeezekv
from squeezekv.generation import cache_kwargs
from squeezekv.store import (
    LOCK_NAME,
    DiskTier,
    KVSnapshot,
    KVStore,
    LayerState,
    LayerwiseLoad,
    MemoryTier,
    capture,
    chain,
    entry_key,
    from_bytes,
    namespace,
    parse_bytes,
    restore,
    shift_positions,
    to_bytes,
)

ROOT = namespace(model="tiny", cache="test")


def _forward(model, ids, cache):
    return model(input_ids=torch.tensor([list(ids)]), use_cache=True, **cache_kwargs(model, cache)).logits[0]


def _tiers(tmp_path, gpu=1 << 30, cpu=1 << 30, disk=1 << 30):
    return [MemoryTier("gpu", gpu, "cpu"), MemoryTier("cpu", cpu, "cpu"), DiskTier(tmp_path / "kv", disk)]


def _store_in(tier: str, tmp_path, clock=None) -> KVStore:
    """A store whose new entries land in ``tier`` (the faster tiers have no room)."""
    caps = {"gpu": dict(gpu=1 << 30), "cpu": dict(gpu=0, cpu=1 << 30), "disk": dict(gpu=0, cpu=0, disk=1 << 30)}
    kw = {"gpu": 0, "cpu": 0, "disk": 0, **caps[tier]}
    return KVStore(_tiers(tmp_path, **kw), ROOT, block=8, **({"clock": clock} if clock else {}))


# -- keys ---------------------------------------------------------------------------------------------------------
def test_hash_chain_is_a_prefix_code():
    a = list(range(3, 43))
    b = a[:24] + [99] + a[25:]
    ca, cb = chain(a, ROOT, 8), chain(b, ROOT, 8)
    assert len(ca) == 5 and ca[:3] == cb[:3] and ca[3] != cb[3] and ca[4] != cb[4]
    assert chain(a, namespace(model="other"), 8)[0] != ca[0]  # another model never shares entries
    assert entry_key(a, ROOT, 8) != entry_key(a[:-1], ROOT, 8)


# -- exact reuse: full cache --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", ["gpu", "cpu", "disk"])
def test_full_cache_reuse_is_exact_from_each_tier(tier, tmp_path, make_model, make_ids):
    model = make_model("llama", layers=2)
    ids = make_ids(1, 50, seed=3)[0].tolist()
    turn1, turn2 = ids[:37], ids[37:]
    live = DynamicCache(config=model.config)
    _forward(model, turn1, live)
    store = _store_in(tier, tmp_path)
    store.put(capture(live, turn1))
    assert store.usage()[tier]["entries"] == 1
    snap = store.get(ids)
    assert snap is not None and snap.tokens == tuple(turn1)
    assert store.stats[f"hit_{tier}"] == 1
    reused = _forward(model, turn2, restore(snap, model))
    continued = _forward(model, turn2, live)
    assert torch.equal(reused, continued)  # bit for bit: the restored cache is the same KV
    recomputed = _forward(model, ids, DynamicCache(config=model.config))[37:]
    torch.testing.assert_close(reused, recomputed, atol=1e-5, rtol=0)


def test_demotion_then_promotion_keeps_reuse_exact(tmp_path, make_model, make_ids):
    model = make_model("llama", layers=2)
    convs = [make_ids(1, 30, seed=s)[0].tolist() for s in (11, 12, 13)]
    snaps = []
    for c in convs:
        cache = DynamicCache(config=model.config)
        _forward(model, c[:24], cache)
        snaps.append(capture(cache, c[:24]))
    size = snaps[0].nbytes()
    store = KVStore(_tiers(tmp_path, gpu=size, cpu=size, disk=10 * size), ROOT, block=8)
    for s in snaps:
        store.put(s)
    keys = [entry_key(c[:24], ROOT, 8) for c in convs]
    assert [store.tier_of(k) for k in keys] == ["disk", "cpu", "gpu"]  # oldest demoted furthest
    snap = store.get(convs[0])  # from disk, promoted back to gpu; the others move down one tier
    assert store.stats["hit_disk"] == 1
    assert [store.tier_of(k) for k in keys] == ["gpu", "disk", "cpu"]
    recomputed = _forward(model, convs[0], DynamicCache(config=model.config))[24:]
    torch.testing.assert_close(_forward(model, convs[0][24:], restore(snap, model)), recomputed, atol=1e-5, rtol=0)
    snap2 = store.get(convs[0])  # now a gpu hit, same tensors as before the round trip
    assert store.stats["hit_gpu"] == 1
    assert all(torch.equal(a.tensors["keys"], b.tensors["keys"]) for a, b in zip(snap.layers, snap2.layers))


def test_shared_prefix_of_another_session_is_reused_and_exact(tmp_path, make_model, make_ids):
    model = make_model("llama", layers=2)
    system = make_ids(1, 20, seed=5)[0].tolist()
    a = system + make_ids(1, 15, seed=6)[0].tolist()
    b = system + make_ids(1, 12, seed=7)[0].tolist()
    cache = DynamicCache(config=model.config)
    _forward(model, a, cache)
    store = _store_in("cpu", tmp_path)
    store.put(capture(cache, a))
    match = store.lookup(b)
    assert match is not None and match.length == 20  # two whole blocks, then extended token by token
    snap = store.load(match)
    reused = _forward(model, b[20:], restore(snap, model))
    recomputed = _forward(model, b, DynamicCache(config=model.config))[20:]
    torch.testing.assert_close(reused, recomputed, atol=1e-5, rtol=0)


def test_reuse_leaves_a_token_to_compute(tmp_path, make_model, make_ids):
    model = make_model("llama", layers=1)
    ids = make_ids(1, 16, seed=2)[0].tolist()
    cache = DynamicCache(config=model.config)
    _forward(model, ids, cache)
    store = _store_in("gpu", tmp_path)
    store.put(capture(cache, ids))
    assert store.lookup(ids).length == 15  # the same prompt again: the last token is recomputed for its logits


# -- exact reuse: compressed caches -------------------------------------------------------------------------------
@pytest.mark.parametrize("method,allocation", [("snapkv", "uniform"), ("h2o", "uniform"), ("streamingllm", "squeeze"),
                                               ("window", "pyramid")])
def test_compressed_cache_reuse_equals_continuing_the_same_object(method, allocation, tmp_path, make_model, make_ids,
                                                                  method_params):
    model = make_model("llama", layers=3)
    ids = make_ids(1, 60, seed=4)[0].tolist()
    turn1, turn2, decode = ids[:40], ids[40:52], ids[52:]
    live = squeezekv.make_cache(model, method, 16, allocation, method_params=method_params(method))
    _forward(model, turn1, live)
    assert max(live.physical_lengths()) < 40  # really compressed
    store = _store_in("disk", tmp_path)  # through bytes on disk
    store.put(capture(live, turn1))
    snap = store.get(ids)
    assert snap is not None and snap.cache_kind == "squeeze"
    restored = restore(snap, model)
    outs_live, outs_restored = [_forward(model, turn2, live)], [_forward(model, turn2, restored)]
    for t in decode:  # decoding keeps evicting for window/streamingllm/h2o: still identical
        outs_live.append(_forward(model, [t], live))
        outs_restored.append(_forward(model, [t], restored))
    for a, b in zip(outs_live, outs_restored):
        assert torch.equal(a, b)
    assert restored.physical_lengths() == live.physical_lengths()


def test_in_memory_snapshot_keeps_the_scores_of_its_capture(make_model, make_ids, method_params):
    """An in-memory snapshot (no bytes in between) shares keys/values with the live cache but owns its scores: the
    live H2O cache goes on accumulating attention into its scores in place (in the buffer the captured scores are a
    view of), and restoring the snapshot still gives
    the cache as it was when captured (its logits equal those of a cache that never went past the capture)."""
    model = make_model("llama", layers=2)
    ids = make_ids(1, 50, seed=5)[0].tolist()
    turn1, more = ids[:41], ids[41:]
    live = squeezekv.make_cache(model, "h2o", 4096, "uniform", method_params=method_params("h2o"))
    twin = squeezekv.make_cache(model, "h2o", 4096, "uniform", method_params=method_params("h2o"))
    for cache in (live, twin):  # a prompt, then one decoded token: the layers' buffers now have free slots
        _forward(model, turn1[:40], cache)
        _forward(model, turn1[40:], cache)
    snap = capture(live, turn1)
    before = [layer.tensors["scores"].clone() for layer in snap.layers]
    for t in more:  # appended into the same buffers; H2O adds each step's attention to the scores in place
        _forward(model, [t], live)
    for layer, ref in zip(snap.layers, before):
        assert torch.equal(layer.tensors["scores"], ref)
    restored = restore(snap, model)
    assert torch.equal(_forward(model, more, restored), _forward(model, more, twin))


def test_compressed_entry_is_smaller_and_only_reused_as_a_whole(tmp_path, make_model, make_ids, method_params):
    model = make_model("llama", layers=2)
    ids = make_ids(1, 48, seed=8)[0].tolist()
    full = DynamicCache(config=model.config)
    comp = squeezekv.make_cache(model, "snapkv", 12, method_params={"window": 8})
    _forward(model, ids[:40], full)
    _forward(model, ids[:40], comp)
    s_full, s_comp = capture(full, ids[:40]), capture(comp, ids[:40])
    assert s_comp.nbytes() < 0.5 * s_full.nbytes()
    store = _store_in("gpu", tmp_path)
    store.put(s_comp)
    assert store.lookup(ids).length == 40
    assert store.lookup(ids[:39] + [5] + ids[40:]) is None  # a compressed cache cannot be cropped to a shorter prefix


# -- truncation ---------------------------------------------------------------------------------------------------
def test_truncation_by_rerotation_equals_recomputing_the_truncated_history(make_model, make_ids):
    # one layer: a token's KV depends only on itself and its position, so re-rotated KV == recomputed KV
    model = make_model("llama", layers=1)
    ids = make_ids(1, 50, seed=9)[0].tolist()
    history, new, drop = ids[:40], ids[40:], 13
    cache = DynamicCache(config=model.config)
    _forward(model, history, cache)
    shifted = shift_positions(capture(cache, history), model, drop)
    assert shifted.tokens == tuple(history[drop:])
    reused = _forward(model, new, restore(shifted, model))
    recomputed = _forward(model, history[drop:] + new, DynamicCache(config=model.config))[len(history) - drop:]
    torch.testing.assert_close(reused, recomputed, atol=1e-5, rtol=0)
    assert not torch.allclose(reused, _forward(model, new, restore(capture(cache, history), model)), atol=1e-3)


def test_rerotated_keys_equal_keys_computed_at_the_new_positions(make_model, make_ids):
    model = make_model("qwen3", layers=2)  # qwen3: k-norm before RoPE, still a pure rotation after it
    ids = make_ids(1, 30, seed=10)[0].tolist()
    cache = DynamicCache(config=model.config)
    _forward(model, ids, cache)
    shifted = shift_positions(capture(cache, ids), model, 7)
    ref = DynamicCache(config=model.config)
    _forward(model, ids[7:], ref)
    torch.testing.assert_close(shifted.layers[0].tensors["keys"], ref.layers[0].keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(shifted.layers[0].tensors["values"], ref.layers[0].values, atol=1e-6, rtol=0)


def test_compressed_snapshot_cannot_be_rerotated(make_model, make_ids):
    model = make_model("llama", layers=1)
    cache = squeezekv.make_cache(model, "window", 8)
    ids = make_ids(1, 20)[0].tolist()
    _forward(model, ids, cache)
    with pytest.raises(ValueError, match="only a full"):
        shift_positions(capture(cache, ids), model, 4)


# -- eviction and accounting on a fake clock ----------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def _fake_snapshot(tokens, n=4) -> KVSnapshot:
    kv = torch.full((1, 1, len(tokens), n), float(tokens[0]))  # [1, H=1, len, D=n]: 4 * len * n bytes each
    return KVSnapshot(tuple(tokens), "dynamic", [LayerState("dynamic", {"keys": kv, "values": kv.clone()})])


def test_lru_eviction_order_and_byte_accounting(tmp_path):
    clock = FakeClock()
    seqs = [[10 + i] * 8 for i in range(6)]
    size = _fake_snapshot(seqs[0]).nbytes()
    assert size == 2 * 4 * 8 * 4
    store = KVStore(_tiers(tmp_path, gpu=2 * size, cpu=size, disk=2 * size), ROOT, block=8, clock=clock)
    keys = [store.put(_fake_snapshot(s)) for s in seqs[:4]]
    assert [store.tier_of(k) for k in keys] == ["disk", "cpu", "gpu", "gpu"]
    assert store.usage() == {"gpu": {"capacity": 2 * size, "used": 2 * size, "entries": 2},
                             "cpu": {"capacity": size, "used": size, "entries": 1},
                             "disk": {"capacity": 2 * size, "used": size, "entries": 1}}
    assert len(list((tmp_path / "kv").glob("*.kv"))) == 1
    assert store.get(seqs[2] + [1]) is not None  # touch entry 2: entry 3 is now the LRU one in the gpu tier
    keys += [store.put(_fake_snapshot(s)) for s in seqs[4:]]
    # put 4: gpu evicts 3 -> cpu evicts 1 -> disk (0, 1); put 5: gpu evicts 2 -> cpu evicts 3 -> disk full, drops 0
    assert [store.tier_of(k) for k in keys] == [None, "disk", "cpu", "disk", "gpu", "gpu"]
    assert store.stats["evicted_disk"] == 1
    assert store.lookup(seqs[0] + [1]) is None
    assert sum(u["used"] for u in store.usage().values()) == 5 * size
    assert len(list((tmp_path / "kv").glob("*.kv"))) == 2


def test_queue_aware_eviction_and_prefetch(tmp_path):
    clock = FakeClock()
    seqs = [[20 + i] * 8 for i in range(4)]
    size = _fake_snapshot(seqs[0]).nbytes()
    store = KVStore(_tiers(tmp_path, gpu=2 * size, cpu=2 * size, disk=0), ROOT, block=8, clock=clock)
    keys = [store.put(_fake_snapshot(s)) for s in seqs[:3]]
    assert [store.tier_of(k) for k in keys] == ["cpu", "gpu", "gpu"]
    m = store.enqueue("req-0", seqs[0] + [7])  # queued: its entry is prefetched to the gpu tier ...
    assert m is not None and m.key == keys[0] and store.tier_of(keys[0]) == "gpu"
    assert store.stats["prefetched"] == 1
    store.put(_fake_snapshot(seqs[3]))  # ... and is not the victim although it is not the most recent
    assert store.tier_of(keys[0]) == "gpu"
    store.dequeue("req-0")
    assert store.wanted == {}


def test_entry_larger_than_a_tier_goes_to_the_next_one(tmp_path):
    size = _fake_snapshot([1] * 8).nbytes()
    store = KVStore(_tiers(tmp_path, gpu=size // 2, cpu=size, disk=0), ROOT, block=8)
    assert store.tier_of(store.put(_fake_snapshot([1] * 8))) == "cpu"
    store.put(_fake_snapshot([3] * 16))  # fits nowhere: not stored
    assert store.stats["too_large"] == 1


# -- disk crash safety --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_disk_entry_is_detected_and_recomputed(damage, tmp_path, make_model, make_ids):
    model = make_model("llama", layers=1)
    ids = make_ids(1, 30, seed=12)[0].tolist()
    cache = DynamicCache(config=model.config)
    _forward(model, ids[:24], cache)
    store = _store_in("disk", tmp_path)
    key = store.put(capture(cache, ids[:24]))
    path = tmp_path / "kv" / f"{key}.kv"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert store.get(ids) is None  # never used ...
    assert store.stats["corrupt_disk"] == 1 and store.tier_of(key) is None and not path.exists()
    # ... the caller recomputes, and the recomputed entry is stored and used again
    fresh = DynamicCache(config=model.config)
    _forward(model, ids[:24], fresh)
    store.put(capture(fresh, ids[:24]))
    assert store.get(ids) is not None and store.stats["hit_disk"] == 1


def test_disk_tier_writes_atomically_and_cleans_only_its_own_partial_files(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 20)
    snap = _fake_snapshot([4] * 8)
    key = entry_key(snap.tokens, ROOT, 8)
    tier.put(key, snap, snap.nbytes())
    names = lambda: sorted(p.name for p in (tmp_path / "d").iterdir())  # noqa: E731
    assert names() == sorted([f"{key}.kv", LOCK_NAME])  # no temp file left behind
    tier.close()
    own = f".{key}.123.{'0' * 16}.tmp"
    (tmp_path / "d" / own).write_bytes(b"half a write")  # a crash mid-write, in the tier's own naming scheme
    (tmp_path / "d" / "notes.tmp").write_bytes(b"a user's file")  # not the tier's: kept
    (tmp_path / "d" / f"{'a' * 64}.kv").write_bytes(b"another program's file")  # not the tier's format: kept
    tier = DiskTier(tmp_path / "d", 1 << 20)
    assert tier.scan() == [(key, tier.scan()[0][1], tier.scan()[0][2])]  # the foreign .kv is not indexed
    assert names() == sorted([f"{key}.kv", LOCK_NAME, "notes.tmp", f"{'a' * 64}.kv"])
    assert torch.equal(tier.get(key).layers[0].tensors["keys"], snap.layers[0].tensors["keys"])
    tier.close()


def test_snapshot_bytes_round_trip(make_model, make_ids):
    model = make_model("gemma3_text", layers=2)  # a sliding layer and a managed full layer
    ids = make_ids(1, 20)[0].tolist()
    cache = squeezekv.make_cache(model, "h2o", 10)
    _forward(model, ids, cache)
    snap = from_bytes(to_bytes(capture(cache, ids)))
    restored = restore(snap, model)
    nxt = make_ids(1, 3, seed=4)[0].tolist()
    assert torch.equal(_forward(model, nxt, restored), _forward(model, nxt, cache))


def test_async_save_and_layerwise_load_on_cpu(tmp_path, make_model, make_ids):
    model = make_model("llama", layers=2)
    ids = make_ids(1, 30)[0].tolist()
    cache = DynamicCache(config=model.config)
    _forward(model, ids[:20], cache)
    store = _store_in("cpu", tmp_path)
    store.save_async(capture(cache, ids[:20]))
    store.flush()
    snap = store.get(ids)
    with LayerwiseLoad(snap, model, "cpu") as loaded:  # CPU: the synchronous path
        out = _forward(model, ids[20:], loaded)
    assert torch.equal(out, _forward(model, ids[20:], cache))
    store.close()


@pytest.mark.parametrize("text,value", [("8GiB", 8 << 30), ("500MB", 500_000_000), ("1024", 1024), ("0", 0)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["8 parsecs", "", "-3", "GiB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_bytes(text)


def test_disk_entries_survive_a_restart(tmp_path, make_model, make_ids):
    model = make_model("llama", layers=2)
    ids = make_ids(1, 40, seed=14)[0].tolist()
    cache = DynamicCache(config=model.config)
    _forward(model, ids[:30], cache)
    first = _store_in("disk", tmp_path)
    first.put(capture(cache, ids[:30]))
    first.put(_fake_snapshot([9] * 8))
    first.close()
    (tmp_path / "kv" / ("0" * 64 + ".kv")).write_bytes(b"garbage")  # not this format: ignored, never deleted
    other = KVStore(_tiers(tmp_path, gpu=0, cpu=0), namespace(model="another"), block=8)
    assert other.stats["recovered"] == 0  # another model's entries are not adopted ...
    assert len(list((tmp_path / "kv").glob("*.kv"))) == 3  # ... nor deleted
    other.close()
    second = _store_in("disk", tmp_path)
    assert second.stats["recovered"] == 2 and second.usage()["disk"]["entries"] == 2
    snap = second.get(ids)
    assert snap is not None and len(snap.tokens) == 30
    assert torch.equal(_forward(model, ids[30:], restore(snap, model)), _forward(model, ids[30:], cache))
    second.close()
    small = KVStore(_tiers(tmp_path, gpu=0, cpu=0, disk=snap.nbytes()), ROOT, block=8)  # over capacity: oldest go
    assert small.usage()["disk"]["used"] <= snap.nbytes() and small.stats["evicted_disk"] >= 1
    assert (tmp_path / "kv" / ("0" * 64 + ".kv")).exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", [None, "h2o"])
def test_layerwise_load_overlapped_on_cuda_is_exact(method, make_model, make_ids):
    # written for GPU machines; never run in this CPU-only CI (not verified yet)
    model = make_model("llama", layers=3).cuda()
    ids = make_ids(1, 40, seed=15)[0].tolist()
    live = DynamicCache(config=model.config) if method is None else squeezekv.make_cache(model, method, 16)
    _forward_dev = lambda ids_, c: model(input_ids=torch.tensor([ids_], device="cuda"), use_cache=True,
                                         **cache_kwargs(model, c)).logits[0]
    _forward_dev(ids[:30], live)
    snap = capture(live, ids[:30]).to("cpu")
    load = LayerwiseLoad(snap, model, "cuda")
    assert load.overlapped
    with load as cache:
        out = _forward_dev(ids[30:], cache)
    assert torch.equal(out, _forward_dev(ids[30:], live))


def test_compressed_entries_fit_more_conversations_per_tier(tmp_path, make_model, make_ids):
    model = make_model("llama", layers=2)
    convs = [make_ids(1, 40, seed=30 + s)[0].tolist() for s in range(6)]

    def snapshots(compressed: bool):
        out = []
        for c in convs:
            cache = (squeezekv.make_cache(model, "snapkv", 10, method_params={"window": 8}) if compressed
                     else DynamicCache(config=model.config))
            _forward(model, c, cache)
            out.append(capture(cache, c))
        return out

    full, comp = snapshots(False), snapshots(True)
    capacity = 2 * full[0].nbytes()
    held = {}
    for name, snaps in (("full", full), ("compressed", comp)):
        store = KVStore([MemoryTier("gpu", capacity, "cpu")], ROOT, block=8)
        for s in snaps:
            store.put(s)
        held[name] = store.usage()["gpu"]["entries"]
        assert store.usage()["gpu"]["used"] <= capacity
    assert held == {"full": 2, "compressed": 6}


# -- every layer type: an exact round trip, or a refusal by name ----------------------------------------------------
KIVI_QUANT = {"bits": 2, "group_size": 8, "residual": 8, "kernel": "torch"}


def _coupled_params(model, tmp_path):
    from squeezekv.channel import coupled as cq

    path = tmp_path / "cq.pt"
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(99))
    cq.save_codebooks(cq.calibrate(model, ids, 1, 4, iters=5), path, bits=1, channels=4)
    return {"bits": 1, "channels": 4, "calibration": str(path)}


def _eigen_params(model, tmp_path):
    from squeezekv.channel.eigen_calibrate import calibrate, save

    g = torch.Generator().manual_seed(99)
    seqs = [torch.randint(3, model.config.vocab_size, (48,), generator=g).tolist() for _ in range(4)]
    save(calibrate(model, seqs), tmp_path / "eigen.pt")
    return {"calibration": str(tmp_path / "eigen.pt")}


#: layer type -> (make_cache keyword arguments given the model and tmp_path; whether the store saves it exactly)
LAYER_TYPES = {
    "SqueezeLayer": (lambda m, p: dict(method="h2o", budget=20), True),
    "KIVILayer": (lambda m, p: dict(method="h2o", budget=30, channel="kivi", channel_params=KIVI_QUANT), True),
    "CoupledLayer": (lambda m, p: dict(method="window", budget=4096, channel="coupled",
                                       channel_params=_coupled_params(m, p)), False),
    "EigenLayer": (lambda m, p: dict(method="window", budget=4096, channel="eigen",
                                     channel_params=_eigen_params(m, p)), False),
    "MiniCacheLayer": (lambda m, p: dict(method="window", budget=4096, crosslayer="minicache",
                                         crosslayer_params={"start_layer": 0}), False),
    "SourceLayer": (lambda m, p: dict(method="h2o", budget=4096, crosslayer="shared_attention",
                                      crosslayer_params={"spans": [[0, 1]]}), False),
    "SourceLayer[KIVILayer]": (lambda m, p: dict(method="h2o", budget=4096, channel="kivi", channel_params=KIVI_QUANT,
                                                 crosslayer="shared_attention",
                                                 crosslayer_params={"spans": [[0, 1]]}), False),
}


@pytest.mark.parametrize("layer_type", list(LAYER_TYPES))
def test_capture_round_trips_every_layer_type_exactly_or_refuses_it_by_name(layer_type, tmp_path, make_model,
                                                                             make_ids):
    """Issue 18, item 7: a KIVI cache lost its quantised tokens in the store (logits off by 0.2, no error). Every
    layer type either comes back from every tier with the same next-step logits bit for bit, or capture refuses it."""
    model = make_model("llama", layers=2)
    kwargs, saved = LAYER_TYPES[layer_type]
    kw = kwargs(model, tmp_path)
    ids = make_ids(1, 48, seed=5)[0].tolist()
    turn1, turn2 = ids[:40], ids[40:]

    def live_cache():
        cache = squeezekv.make_cache(model, **kw, allocation="uniform")
        _forward(model, turn1, cache)
        return cache

    live = live_cache()
    assert type(live.layers[0]).__name__ == layer_type
    if not saved:
        with pytest.raises(TypeError, match=rf"store.capture cannot save layer type {re.escape(layer_type)} "):
            capture(live, turn1)
        return
    if layer_type == "KIVILayer":
        assert all(layer.nq > 0 for layer in live.layers)  # the prompt is really quantised
    for tier in ("gpu", "cpu", "disk"):
        live = live_cache()
        store = _store_in(tier, tmp_path / tier)
        store.put(capture(live, turn1))
        assert store.usage()[tier]["entries"] == 1
        snap = store.get(ids)
        assert snap is not None and store.stats[f"hit_{tier}"] == 1
        restored = restore(snap, model)
        assert [type(l).__name__ for l in restored.layers] == [layer_type] * 2
        for tok in turn2:  # one token at a time: decoding steps (KIVI flushes a group on the way)
            assert torch.equal(_forward(model, [tok], restored), _forward(model, [tok], live)), tier
        assert restored.physical_lengths() == live.physical_lengths()


def test_restored_kivi_cache_holds_the_quantised_tokens(tmp_path, make_model, make_ids):
    """The prompt (40 tokens) is longer than KIVI's residual (8): 32 tokens per head are quantised and come back as
    the same packed codes, scales/zeros and residual; nothing is evicted, so the logits are the full snapshot's."""
    model = make_model("llama", layers=2)
    ids = make_ids(1, 44, seed=6)[0].tolist()
    live = squeezekv.make_cache(model, "window", 4096, channel="kivi", channel_params=KIVI_QUANT)
    _forward(model, ids[:40], live)
    snap = from_bytes(to_bytes(capture(live, ids[:40])))
    restored = restore(snap, model)
    for a, b in zip(live.layers, restored.layers):
        assert a.nq == b.nq == 32 and b.residual_length == 8
        for name in ("keys", "values", "token_idx", "kcode", "vcode", "kscale", "kzero", "vscale", "vzero"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert b.kgid is None and a.kgid is None
    assert restored.nbytes() <= live.nbytes()  # no reserved slots in the restored copy
    for tok in ids[40:]:
        assert torch.equal(_forward(model, [tok], restored), _forward(model, [tok], live))


def test_kivi_cache_with_evicted_quantised_tokens_round_trips(make_model, make_ids):
    """H2O evicting quantised tokens while decoding gives KIVI per-token key group ids (kgid): saved and restored."""
    model = make_model("llama", layers=2)
    ids = make_ids(1, 56, seed=3)[0].tolist()
    live = squeezekv.make_cache(model, "h2o", 24, channel="kivi", channel_params=KIVI_QUANT, allocation="uniform")
    _forward(model, ids[:40], live)
    for tok in ids[40:50]:
        _forward(model, [tok], live)
    assert all(layer.kgid is not None and layer.nq > 0 for layer in live.layers)
    restored = restore(from_bytes(to_bytes(capture(live, ids[:50]))), model)
    for tok in ids[50:]:
        assert torch.equal(_forward(model, [tok], restored), _forward(model, [tok], live))


def test_a_hit_prefetched_from_disk_counts_as_a_disk_hit(tmp_path):
    size = _fake_snapshot([5] * 16).nbytes()
    store = KVStore(_tiers(tmp_path, gpu=size, cpu=0, disk=1 << 20), ROOT, block=8)
    store.put(_fake_snapshot([5] * 16))
    store.put(_fake_snapshot([6] * 16))  # demotes the first to disk
    prompt = [5] * 16 + [7]
    assert store.lookup(prompt).tier == "disk"
    store.enqueue("r1", prompt)  # prefetch: promoted to the GPU tier before the request runs
    assert store.lookup(prompt).tier == "gpu"
    assert store.get(prompt) is not None
    assert (store.stats["hit_disk"], store.stats["hit_gpu"]) == (1, 0)  # where it was served from: disk
    store.close()


def test_a_corrupt_entry_falls_back_to_a_shorter_valid_prefix(tmp_path):
    store = _store_in("disk", tmp_path)
    short, long = _fake_snapshot([3] * 16), _fake_snapshot([3] * 16 + [4] * 16)
    store.put(short)
    store.put(long)
    path = tmp_path / "kv" / f"{entry_key(long.tokens, ROOT, 8)}.kv"
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    snap = store.get([3] * 16 + [4] * 16 + [9])
    assert snap is not None and snap.tokens == short.tokens  # the 16-token entry instead of a miss
    assert store.stats["corrupt_disk"] == 1 and store.stats["miss"] == 0
    store.close()


def test_scopes_never_see_each_others_entries(tmp_path):
    store = KVStore([MemoryTier("cpu", 1 << 20, "cpu")], ROOT, block=8)
    store.put(_fake_snapshot([8] * 16), scope="alice")
    prompt = [8] * 16 + [1]
    assert store.lookup(prompt, scope="bob") is None and store.lookup(prompt) is None
    assert store.get(prompt, scope="alice").tokens == (8,) * 16
