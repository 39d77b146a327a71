"""The ``eval_grid`` kind: one ``squeezekv eval`` grid run as parallel shards (independent ``squeezekv eval``
processes on one device, split by (method, allocation[, channel]); each shard evaluates the full cache too, which
is deterministic; kvpress's presses spread over the first shards), then merged into one results folder
(``OUT/<case>/results.jsonl`` + ``config.json``; records deduplicated by (cell, example)); ``squeezekv eval
--report-only --out OUT/<case>`` then writes the report. Every shard resumes on its own: rerun the suite with the
same ``--out`` after a deadline stopped it. The model and data must be where ``squeezekv eval`` finds them
(``SQUEEZEKV_CACHE``, ``SQUEEZEKV_LINUX_DOC``). Code moved from the former eval_sharded.py."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..suite import Case
from . import kind

METHODS = ["window", "streamingllm", "h2o", "snapkv"]
ALLOCATIONS = ["uniform", "pyramid", "squeeze"]
PRESSES = ["streamingllm", "snapkv", "pyramidkv", "observed", "expected"]


def shard_plan(methods, allocations, presses, channels=None) -> list[dict]:
    """One shard per (method, allocation), and per channel entry when ``channels`` is given (method ``none``, no
    eviction, takes no allocation: one shard per channel; ``none`` with channel ``none`` is the full cache alone)."""
    if channels:
        shards = [{"methods": m, "allocations": a, "channels": c, "presses": []}
                  for m, c, a in itertools.product(methods, channels, allocations)
                  if not (m == "none" and (c == "none" or a != allocations[0]))]
    else:
        shards = [{"methods": m, "allocations": a, "presses": []} for m, a in itertools.product(methods, allocations)]
    for i, p in enumerate(presses):
        shards[i % len(shards)]["presses"].append(p)
    return shards


def own_params(extra: list[str], channel: str) -> list[str]:
    """The grid arguments without ``--channel-param LABEL:...`` of channels other than ``channel`` (a shard's grid
    holds one channel, and refuses parameters for channels it does not hold)."""
    label, out, i = channel.split("=")[0], [], 0
    while i < len(extra):
        if extra[i] == "--channel-param" and i + 1 < len(extra):
            if extra[i + 1].split(":", 1)[0] == label:
                out += extra[i:i + 2]
            i += 2
            continue
        out.append(extra[i])
        i += 1
    return out


def prepare_once(grid_args: list[str]) -> None:
    """Obtain the grid's model and RULER's files before the shards start (each shard would otherwise fetch them at
    the same time, into the same files)."""
    from squeezekv.assets import resolve_model

    def value(flag: str, default: str) -> str:
        found = [grid_args[i + 1] for i, x in enumerate(grid_args[:-1]) if x == flag]
        return found[-1] if found else default

    resolve_model(value("--model", "default"))
    if "ruler" in value("--tasks", "needle,qa,ppl").split(","):
        from squeezekv.eval.ruler import load_ruler

        load_ruler()


def kvpress_plan(presses, budgets) -> list[dict]:
    """One shard per (press, budget): its squeezekv cell (window/uniform/budget) must already be done (seeded), so
    the shard goes straight to kvpress's side."""
    return [{"methods": "window", "allocations": "uniform", "presses": [p], "budgets": b}
            for p, b in itertools.product(presses, budgets)]


def seed(shard: Path, source: Path, cells: set[str] | None) -> int:
    """Start a new shard from the records of ``source`` (only ``cells`` if given): they count as done."""
    res = shard / "results.jsonl"
    if res.exists() or not source.exists():
        return 0
    from squeezekv.eval.grid import read_records

    kept = [r for r in read_records(source) if cells is None or r["cell"] in cells]
    res.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return len(kept)


def ingest_raw(shard: Path) -> int:
    """Score and record the kvpress worker's raw results that a stopped shard never recorded (the worker writes
    ``kvpress_raw.jsonl`` as it goes; the shard records them when the worker ends). Rebuilds the shard's examples
    from its config (same tokenizer, same offline data -> same token ids). Returns how many were added."""
    raw_path, res = shard / "kvpress_raw.jsonl", shard / "results.jsonl"
    if not raw_path.exists():
        return 0
    from squeezekv.eval import GridConfig, TaskOptions, build_examples, kvpress_side, prepare_sources
    from squeezekv.eval.grid import read_records, score

    raw = kvpress_side._read_raw(raw_path)
    done = {(r["cell"], r["example_id"]) for r in read_records(res)}
    if all((r["cell"], r["example_id"]) in done for r in raw):
        return 0
    stored = json.loads((shard / "config.json").read_text())
    opts = TaskOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored["options"].items()})
    cfg = GridConfig(model=stored["model"], tasks=tuple(stored["tasks"]), options=opts)
    from transformers import AutoTokenizer

    from squeezekv.assets import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
    examples = build_examples(list(cfg.tasks), tok, prepare_sources(cfg), opts)
    base = {"config": {"model": stored["model"], "fingerprint": stored["fingerprint"], "device": stored["device"],
                       "dtype": "torch.float32"}}
    return kvpress_side._append_records(raw, {e.id: e for e in examples}, done, score, base, res)


def merge(out: Path, ingest: bool = False) -> int:
    """Merge every shard's records and config into ``out``; returns the number of records."""
    from squeezekv.eval.grid import read_records

    seen, records, configs = set(), [], []
    for shard in sorted((out / "shards").iterdir()):
        if ingest:
            print(f"{shard.name}: {ingest_raw(shard)} kvpress results recorded from the raw file", flush=True)
        cfg = shard / "config.json"
        if cfg.exists():
            configs.append(json.loads(cfg.read_text()))
        for r in read_records(shard / "results.jsonl"):  # skips a torn last line of an interrupted shard
            key = (r["cell"], r["example_id"])
            if key not in seen:
                seen.add(key)
                records.append(r)
    if not configs:
        raise ValueError(f"no shard under {out / 'shards'} has a config.json")
    merged = dict(configs[0])
    for key in ("tasks", "methods", "allocations", "budgets", "kvpress_presses", "skipped_cells", "channels",
                "crosslayers"):
        merged[key] = list(dict.fromkeys(v for c in configs for v in c.get(key, [])))
    for key in ("channel_params", "crosslayer_params", "aliases"):
        merged[key] = {k: v for c in configs for k, v in (c.get(key) or {}).items()}
    merged["shards"] = len(configs)
    (out / "config.json").write_text(json.dumps(merged, indent=2, default=str))
    with open(out / "results.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return len(records)


@kind("eval_grid", {"methods": METHODS, "allocations": ALLOCATIONS, "channels": [], "presses": PRESSES,
                    "kvpress_python": None, "kvpress_only": [], "seed_from": None, "seed_cells": [],
                    "fresh_first": False, "deadline": 0, "grid_args": [], "merge_only": False, "ingest_raw": False,
                    "baseline": None, "full_once": False, "press_shards": False, "extra_shards": []},
      needs_model=False)
def eval_grid(ctx: Any, case: Case) -> list[dict[str, Any]]:
    """Shards of ``squeezekv eval`` (``grid_args``: its arguments, e.g. ["--budgets", "0.1,0.2"]), stopped after
    ``deadline`` seconds (0: none); kvpress's presses only with ``kvpress_python`` (or $SQUEEZEKV_KVPRESS_PYTHON);
    ``kvpress_only``: budgets, one shard per (press, budget) to finish kvpress's side of a seeded grid;
    ``seed_from``: a results.jsonl whose records (``seed_cells`` only, if given) new shards start from;
    ``full_once``: only the first shard evaluates the full cache; ``press_shards``: one kvpress-only shard per press
    (every budget; the first runs kvpress's full-cache check) instead of presses appended to squeezekv shards;
    ``extra_shards``: more shards, each ``{"methods", "allocations", "channels" (optional), "args"}`` (``args``
    after ``grid_args``: its own budgets or channel parameters), run beside the others and never the full cache;
    ``{"methods": "window", "allocations": "uniform", "presses": [P], "press_only": true, "args": ["--budgets", B]}``
    is one more kvpress-only shard (press P at budgets B, no full-cache check)."""
    a = case.settings
    out = ctx.out / case.name
    kvpy = a["kvpress_python"] or os.environ.get("SQUEEZEKV_KVPRESS_PYTHON")
    exits: dict[str, int] = {}
    t0 = time.time()
    if not a["merge_only"]:
        extra = list(a["grid_args"])
        presses = list(a["presses"]) if kvpy else []
        if a["kvpress_only"]:
            plan = kvpress_plan(presses, [str(b) for b in a["kvpress_only"]])
        else:
            plan = shard_plan(a["methods"], a["allocations"], [] if a["press_shards"] else presses,
                              list(a["channels"]))
            if a["press_shards"]:
                plan += [{"methods": "window", "allocations": "uniform", "presses": [p], "press_only": True}
                         for p in presses]
            # an extra shard may be kvpress-only at its own budgets ({"presses": [P], "press_only": true, "args":
            # ["--budgets", ...]}); without a kvpress python it is left out like the other presses
            plan += [{"presses": [], "extra": True, **x} for x in a["extra_shards"]
                     if kvpy or not (x.get("presses") or x.get("press_only"))]
        prepare_once(extra)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
        procs = []
        for i, s in enumerate(plan):
            name = f"{i:02d}-{s['methods']}-{s['allocations']}"
            if "channels" in s:
                name = f"{i:02d}-{s['methods']}-{s['allocations']}-{s['channels'].split('=')[0]}"
            if "budgets" in s:
                name = f"{i:02d}-kvpress-{s['presses'][0]}-{s['budgets']}"
            if s.get("press_only"):
                name = f"{i:02d}-kvpress-{s['presses'][0]}"
                own = list(s.get("args", []))
                if "--budgets" in own[:-1]:
                    name += "-" + own[own.index("--budgets") + 1]
            d = out / "shards" / name
            d.mkdir(parents=True, exist_ok=True)
            if a["seed_from"] and not (a["fresh_first"] and i == 0):
                cells = set(a["seed_cells"]) if a["seed_cells"] else None
                print(f"{name}: seeded {seed(d, Path(a['seed_from']), cells)} records", flush=True)
            shard_extra = own_params(extra, s["channels"]) if "channels" in s else extra
            cmd = [sys.executable, "-m", "squeezekv.cli", "eval", "--out", str(d), "--device", ctx.device,
                   "--methods", s["methods"], "--allocations", s["allocations"], "--no-progress", *shard_extra]
            if "channels" in s:
                cmd += ["--channels", s["channels"]]
            if "budgets" in s:
                cmd += ["--budgets", s["budgets"]]  # after the shared arguments: this shard's budget wins
                if i > 0:
                    cmd.append("--no-kvpress-full-check")  # the first kvpress shard alone runs the full check
            cmd += list(s.get("args", []))
            if (a["full_once"] and i > 0) or s.get("extra") or s.get("press_only"):
                cmd.append("--no-full-cell")
            if s.get("press_only"):
                cmd.append("--kvpress-only")
                if s["presses"][0] != presses[0] or s.get("extra"):
                    cmd.append("--no-kvpress-full-check")  # the first press shard alone runs the full check
            if s["presses"]:
                cmd += ["--kvpress-python", kvpy, "--kvpress-presses", ",".join(s["presses"])]
            log = open(d / "log.txt", "a")
            # a session of its own: the deadline stops the shard with its kvpress worker (a child process)
            procs.append((d, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True)))
        while any(p.poll() is None for _, p in procs):
            time.sleep(5)
            if a["deadline"] and time.time() - t0 > a["deadline"]:
                for _, p in procs:
                    if p.poll() is None:
                        try:
                            os.killpg(p.pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
                break
        for d, p in procs:
            p.wait()
            exits[d.name] = p.returncode
            print(f"{d.name}: exit {p.returncode}", flush=True)
    n = merge(out, ingest=a["ingest_raw"])
    row = {"folder": str(out), "records": n, "shard_exits": exits, "seconds": time.time() - t0}
    ctx.progress(case, row)
    return [row]
