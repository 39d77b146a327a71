"""Run one ``squeezekv eval`` grid as parallel shards on one GPU, then merge them into one results folder.

A 135M-parameter model leaves an H100/H200 mostly idle, and the grid's cost is Python per decoding step, so the grid
is split by (method, allocation) into independent ``squeezekv eval`` processes (each its own output folder, each also
evaluating the full cache, which is deterministic), kvpress's presses spread over the first shards. Every shard is
resumable on its own. ``--merge-only`` merges what the shards hold (records deduplicated by (cell, example)) into
``OUT/results.jsonl`` + ``OUT/config.json``; then ``squeezekv eval --report-only --out OUT`` writes the report.

    python benchmarks/eval_sharded.py --out runs/grid --device cuda --kvpress-python /tmp/kvpy -- \
        --budgets 0.1,0.2,0.3,0.5 --qa-per-subtask 12
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("window", "streamingllm", "h2o", "snapkv")
ALLOCATIONS = ("uniform", "pyramid", "squeeze")
PRESSES = ("streamingllm", "snapkv", "pyramidkv", "observed", "expected")


def shard_plan(methods, allocations, presses) -> list[dict]:
    shards = [{"methods": m, "allocations": a, "presses": []} for m, a in itertools.product(methods, allocations)]
    for i, p in enumerate(presses):
        shards[i % len(shards)]["presses"].append(p)
    return shards


def merge(out: Path) -> int:
    """Merge every shard's records and config into ``out``; returns the number of records."""
    seen, records, configs = set(), [], []
    for shard in sorted((out / "shards").iterdir()):
        cfg = shard / "config.json"
        if cfg.exists():
            configs.append(json.loads(cfg.read_text()))
        res = shard / "results.jsonl"
        if not res.exists():
            continue
        for line in res.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn last line of an interrupted shard
            key = (r["cell"], r["example_id"])
            if key not in seen:
                seen.add(key)
                records.append(r)
    if not configs:
        raise SystemExit(f"no shard under {out / 'shards'} has a config.json")
    merged = dict(configs[0])
    for key in ("tasks", "methods", "allocations", "budgets", "kvpress_presses", "skipped_cells"):
        merged[key] = list(dict.fromkeys(v for c in configs for v in c.get(key, [])))
    merged["shards"] = len(configs)
    (out / "config.json").write_text(json.dumps(merged, indent=2, default=str))
    with open(out / "results.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return len(records)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--allocations", default=",".join(ALLOCATIONS))
    ap.add_argument("--kvpress-python", default=None)
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--deadline", type=float, default=0, help="seconds after which shards are stopped (0: none); "
                    "a stopped shard resumes on the next run")
    ap.add_argument("--merge-only", action="store_true")
    ap.add_argument("grid_args", nargs=argparse.REMAINDER, help="after --: arguments for every `squeezekv eval`")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.merge_only:
        extra = [a for a in args.grid_args if a != "--"]
        presses = [p for p in args.presses.split(",") if p] if args.kvpress_python else []
        plan = shard_plan(args.methods.split(","), args.allocations.split(","), presses)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        procs = []
        t0 = time.time()
        for i, s in enumerate(plan):
            d = out / "shards" / f"{i:02d}-{s['methods']}-{s['allocations']}"
            d.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "squeezekv.cli", "eval", "--out", str(d), "--device", args.device,
                   "--methods", s["methods"], "--allocations", s["allocations"], "--no-progress", *extra]
            if s["presses"]:
                cmd += ["--kvpress-python", args.kvpress_python, "--kvpress-presses", ",".join(s["presses"])]
            log = open(d / "log.txt", "a")
            procs.append((d, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        while any(p.poll() is None for _, p in procs):
            time.sleep(5)
            if args.deadline and time.time() - t0 > args.deadline:
                for _, p in procs:
                    if p.poll() is None:
                        p.terminate()
                break
        for d, p in procs:
            p.wait()
            print(f"{d.name}: exit {p.returncode}", flush=True)
        print(f"shards took {time.time() - t0:.0f} s", flush=True)
    n = merge(out)
    print(f"merged {n} records into {out / 'results.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
