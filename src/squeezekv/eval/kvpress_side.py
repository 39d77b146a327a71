"""kvpress side by side: the same examples, budgets and scorer, run by :mod:`.kvpress_worker` in kvpress's own
virtual environment (``--kvpress-python``), its records appended to the same ``results.jsonl``.

Cells are named ``kvpress:<press>`` with allocation ``kvpress``; ``kvpress:full`` (a plain ``DynamicCache`` under
kvpress's transformers) checks that the full-cache score is the same in both environments.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .kvpress_worker import PRESSES

WORKER = Path(__file__).with_name("kvpress_worker.py")
ALLOCATION = "kvpress"


def validate(python: str | None, presses: tuple[str, ...]) -> None:
    """Raise before any compute if the interpreter is missing or a press name is unknown."""
    if python is None:
        return
    if not Path(python).is_file():
        raise ValueError(f"--kvpress-python {python!r} is not a file: create kvpress's virtual environment first")
    bad = [p for p in presses if p not in PRESSES]
    if bad:
        raise ValueError(f"unknown kvpress press {bad[0]!r}; choose from: {', '.join(PRESSES)}")


def cells(presses: tuple[str, ...], budgets: tuple[float, ...], full_check: bool = True
          ) -> list[tuple[str, str, float]]:
    """(cell key, press, budget) of every kvpress cell, the full-cache check first (if ``full_check``)."""
    out = [("kvpress:full", "full", 1.0)] if full_check else []
    for p in presses:
        for b in budgets:
            out.append((f"kvpress:{p}/{ALLOCATION}/{b:g}", p, float(b)))
    return out


def _append_records(raw: list[dict[str, Any]], by_id: dict[str, Any], done: set[tuple[str, str]], score_fn: Any,
                    base_record: dict[str, Any], results: Path) -> int:
    """Score raw worker results not yet recorded and append them to ``results``."""
    added = 0
    with open(results, "a", encoding="utf-8") as fh:
        for r in raw:
            if (r["cell"], r["example_id"]) in done or r["example_id"] not in by_id:
                continue
            ex = by_id[r["example_id"]]
            method = "kvpress:full" if r["press"] == "full" else f"kvpress:{r['press']}"
            rec = {**base_record, "cell": r["cell"], "method": method, "allocation": ALLOCATION,
                   "budget": r["budget"], "task": ex.task, "subset": ex.subset, "example_id": ex.id, "meta": ex.meta,
                   "prompt_tokens": len(ex.prompt), "answer": r.get("answer"),
                   "scores": score_fn(ex, r.get("answer"), r.get("nll")),
                   "kv_bytes_after_prefill": r["kv_bytes_after_prefill"], "seconds": r["seconds"],
                   "versions": r["versions"],
                   "config": {**base_record.get("config", {}), "kvpress_press": r["press"]}}
            fh.write(json.dumps(rec) + "\n")
            done.add((r["cell"], r["example_id"]))
            added += 1
    return added


def _read_raw(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by an interrupted worker
    return out


def run(python: str, model_path: str, presses: tuple[str, ...], budgets: tuple[float, ...], examples: list[Any],
        done: set[tuple[str, str]], score_fn: Any, base_record: dict[str, Any], results: Path,
        device: str = "cpu", full_check: bool = True, dtype: str = "float32") -> int:
    """Run the pending kvpress (cell, example) pairs in the other environment; append scored records. The worker's
    raw results are kept in ``kvpress_raw.jsonl`` beside ``results``, so an interrupted worker loses at most the
    run in flight. Returns how many records were added."""
    by_id = {e.id: e for e in examples}
    raw_path = results.with_name("kvpress_raw.jsonl")
    added = _append_records(_read_raw(raw_path), by_id, done, score_fn, base_record, results)
    jobs = []
    for e in examples:
        for key, press, budget in cells(presses, budgets, full_check):
            if (key, e.id) not in done:
                jobs.append({"cell": key, "press": press, "budget": budget, "example_id": e.id})
    if not jobs:
        return added
    with tempfile.TemporaryDirectory() as tmp:
        ex_path, job_path = Path(tmp) / "examples.jsonl", Path(tmp) / "jobs.jsonl"
        with open(ex_path, "w", encoding="utf-8") as fh:
            for e in examples:
                fh.write(json.dumps({"id": e.id, "kind": e.kind, "prompt": list(e.prompt),
                                     "continuation": list(e.continuation), "max_new_tokens": e.max_new_tokens}) + "\n")
        job_path.write_text("".join(json.dumps(j) + "\n" for j in jobs), encoding="utf-8")
        try:
            proc = subprocess.run([python, str(WORKER), "--model", model_path, "--examples", str(ex_path), "--jobs",
                                   str(job_path), "--out", str(raw_path), "--device", device,
                                   "--dtype", dtype])
        finally:
            added += _append_records(_read_raw(raw_path), by_id, done, score_fn, base_record, results)
    if proc.returncode != 0:
        raise RuntimeError(f"kvpress worker failed with exit code {proc.returncode} ({added} records added; "
                           "rerun to resume)")
    return added
