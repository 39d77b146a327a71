"""LCKV training plumbing: shards hold exactly the tokenised text, batches depend only on (seed, step), and a resumed
run ends with the same weights as an uninterrupted one. Tiny CPU runs on a temporary text folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from squeezekv.crosslayer.lckv import LCKVForCausalLM
from squeezekv.crosslayer.lckv.data import ByteTokenizer, load_shard, prepare_shards, sample_batch
from squeezekv.crosslayer.lckv.train import TrainConfig, train

DOCS = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (8 + i) for i in range(6)]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "text"
    root.mkdir()
    for i, doc in enumerate(DOCS):
        (root / f"{i:02d}.txt").write_text(doc)
    return root


def test_shards_hold_exactly_the_tokenised_documents(corpus, tmp_path):
    info = prepare_shards(tmp_path / "data", [str(corpus)], "bytes", val_every=3, progress=False)
    tok = ByteTokenizer()
    val_docs = [DOCS[2], DOCS[5]]  # every 3rd document
    train_docs = [d for d in DOCS if d not in val_docs]
    expect_train = np.concatenate([tok.encode(d) + [2] for d in train_docs])
    expect_val = np.concatenate([tok.encode(d) + [2] for d in val_docs])
    assert np.array_equal(load_shard(info.path, "train"), expect_train)
    assert np.array_equal(load_shard(info.path, "val"), expect_val)
    meta = json.loads((info.path / "meta.json").read_text())
    assert (meta["dtype"], meta["train_tokens"], meta["val_tokens"]) == ("uint16", len(expect_train), len(expect_val))
    a = sample_batch(load_shard(info.path, "train"), 3, 16, step=5, seed=7)
    assert a.shape == (3, 16) and torch.equal(a, sample_batch(load_shard(info.path, "train"), 3, 16, 5, 7))
    assert not torch.equal(a, sample_batch(load_shard(info.path, "train"), 3, 16, 6, 7))
    with pytest.raises(ValueError, match="'test'"):
        load_shard(info.path, "test")


def _cfg(corpus, tmp_path, out: str, steps: int) -> TrainConfig:
    return TrainConfig(out_dir=str(tmp_path / out), data_dir=str(tmp_path / "data"), sources=[str(corpus)],
                       hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, num_kv_heads=1,
                       warmup_layers=1, forward_passes=2, backward_passes=1, seq_len=24, batch_size=2,
                       max_steps=steps, warmup_steps=1, min_lr_ratio=1.0, eval_windows=2, save_every=100)


def test_resumed_run_equals_uninterrupted_run(corpus, tmp_path):
    with torch.enable_grad():
        full = train(_cfg(corpus, tmp_path, "full", 4), progress=False)
        train(_cfg(corpus, tmp_path, "split", 2), progress=False)
        resumed = train(_cfg(corpus, tmp_path, "split", 4), progress=False)  # picks up the step-2 checkpoint
    assert full["steps"] == resumed["steps"] == 4 and full["tokens"] == 4 * 2 * 24
    a = LCKVForCausalLM.from_pretrained(tmp_path / "full" / "checkpoint").state_dict()
    b = LCKVForCausalLM.from_pretrained(tmp_path / "split" / "checkpoint").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert full["val_ppl"] == resumed["val_ppl"]
    assert full["kv_sources"] == [0, 2, 2]
    lines = (tmp_path / "split" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines if "step" in json.loads(l)] == [1, 2, 3, 4]


def test_bad_option_names_the_value(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"seq_len": 8, "lerning_rate": 1}))
    with pytest.raises(ValueError, match="lerning_rate"):
        TrainConfig.from_json(path)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        TrainConfig(batch_size=0).validate()


def test_max_batch_search_finds_the_exact_limit():
    from squeezekv.crosslayer.lckv.measure import max_batch

    tried: list[int] = []

    def fits(b: int) -> bool:
        tried.append(b)
        return b <= 37

    assert max_batch(None, 4096, 8, cap=4096, fits=fits) == {"max_batch": 37, "capped": False, "context": 4096,
                                                              "gen": 8}
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert max_batch(None, 4096, 8, cap=20, fits=fits)["max_batch"] == 20
    assert max_batch(None, 4096, 8, cap=20, fits=fits)["capped"] is True
    with pytest.raises(ValueError, match="cap must be a positive int, got 0"):
        max_batch(None, 4096, 8, cap=0, fits=fits)


def test_cli_train_lckv_prepare_only(corpus, tmp_path, capsys):
    from squeezekv.cli import main

    rc = main(["train-lckv", "--prepare-only", "--no-progress", "--sources", str(corpus),
               "--data-dir", str(tmp_path / "d")])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    total = sum(len(d.encode()) + 1 for d in DOCS)
    assert report["train_tokens"] + report["val_tokens"] == total and report["vocab_size"] == 259
    assert main(["train-lckv", "--sources", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "e")]) == 2
    assert "not found" in capsys.readouterr().err
