"""squeezekv's benchmark runner: run a suite (a named list of cases, ``benchmarks/suites/SUITE.json``) and write one
JSON with the suite's config, the versions, the device and every case's results.

    python benchmarks/run.py SUITE --out DIR              # writes DIR/SUITE.json (+ DIR/SUITE.records.jsonl)
    python benchmarks/run.py SUITE --out DIR --device cpu --cases full,snapkv
    python benchmarks/run.py --list                       # the suites and the case kinds
    python benchmarks/run.py --check                      # load and validate every committed suite

See benchmarks/README.md for the config format.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "src"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from benchmarks.kinds import KINDS  # noqa: E402
from benchmarks.suite import Case, Suite, load_suite, model_config, suite_names  # noqa: E402


def git_commit() -> dict[str, Any]:
    """squeezekv's git commit (and whether the tree had changes); ``$SQUEEZEKV_GIT_COMMIT`` where the working tree
    is a copy without ``.git`` (a device machine)."""
    if os.environ.get("SQUEEZEKV_GIT_COMMIT"):  # given by the caller: a device copy's .git may be stale
        return {"commit": os.environ["SQUEEZEKV_GIT_COMMIT"], "dirty": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip() != ""
            return {"commit": commit.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": os.environ.get("SQUEEZEKV_GIT_COMMIT"), "dirty": None}


def versions() -> dict[str, Any]:
    import transformers

    import squeezekv

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "squeezekv": squeezekv.__version__, "squeezekv_git": git_commit(), "python": platform.python_version()}


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "machine": platform.platform(), "processor": platform.processor(),
                            "threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        info["gpu"] = None
    return info


class Context:
    """What a case kind gets: the device, the suite's model (built once, on first use), the output folder, the
    rows of cases already run, and where to write progress and raw records."""

    def __init__(self, suite: Suite, device: str, out: Path, records: Path, quiet: bool = False,
                 sources: Any = None) -> None:
        self.suite, self.device, self.out, self.records_path, self.quiet = suite, device, out, records, quiet
        self.sources = sources
        self.results: dict[str, dict[str, Any]] = {}
        self.memo: dict[Any, Any] = {}
        self.extra_versions: dict[str, Any] = {}
        self._model: Any = None
        self._tokenizer: Any = None

    def model_config(self) -> dict[str, Any]:
        if "random" not in self.suite.model:
            raise ValueError(f"suite {self.suite.name!r}: this case needs a random model shape (model.random)")
        return model_config(self.suite.model["random"])

    def _load(self) -> None:
        spec = self.suite.model
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        if "random" in spec:
            from squeezekv.bench import build_model

            self._model = build_model({"model": self.model_config(), "dtype": spec.get("dtype", "bfloat16")},
                                      self.device)
        else:
            from squeezekv.assets import load_model

            dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else None
            self._model, self._tokenizer = load_model(spec.get("pretrained"), device=self.device, dtype=dtype)

    @property
    def model(self) -> Any:
        if self._model is None:
            self._load()
        return self._model

    @property
    def tokenizer(self) -> Any:
        if self._model is None:
            self._load()
        if self._tokenizer is None:
            raise ValueError(f"suite {self.suite.name!r}: this case needs a tokenizer: use model.pretrained")
        return self._tokenizer

    def case(self, name: str) -> Case:
        return next(c for c in self.suite.cases if c.name == name)

    def rows_of(self, name: str) -> list[dict[str, Any]]:
        return self.results.get(name, {}).get("rows", [])

    def progress(self, case: Case, row: dict[str, Any]) -> None:
        if not self.quiet:
            shown = {k: v for k, v in row.items() if k not in ("times", "tries", "us_runs", "store_stats")}
            print(case.name, json.dumps(shown, default=str)[:400], flush=True)

    def record(self, rec: dict[str, Any]) -> None:
        """Append one raw per-example record to the suite's records file (kept out of git)."""
        with open(self.records_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")


def add_ratios(cases: dict[str, dict[str, Any]]) -> None:
    """Each row of a case with a ``baseline`` gets ``<metric>_vs_baseline`` against the baseline's row of the same
    batch/context (tokens/s, KV bytes, max batch, quality KV fraction); with ``compare`` (case names), also
    ``<metric>_vs_<case>`` against each of those cases' rows (e.g. ``tokens_per_s_vs_kvpress-snapkv``)."""
    keys = ("batch", "context", "prefill_chunk", "history", "turn")
    metrics = ("tokens_per_s", "kv_bytes_start", "max_batch", "prefill_s", "kv_bytes", "peak_bytes_over_weights",
               "generated_tokens_per_s", "steady_decode_tokens_per_s")
    for res in cases.values():
        base = res["settings"].get("baseline")
        others = [(base, "baseline")] if base else []
        others += [(name, name) for name in res["settings"].get("compare") or []]
        for other, suffix in others:
            if other not in cases:
                continue
            for row in res["rows"]:
                match = next((b for b in cases[other]["rows"] if all(b.get(k) == row.get(k) for k in keys)
                              and not b.get("oom")), None)
                if match is None or row.get("oom"):
                    continue
                for m in metrics:
                    if isinstance(row.get(m), (int, float)) and isinstance(match.get(m), (int, float)) and match[m]:
                        row[f"{m}_vs_{suffix}"] = row[m] / match[m]


def run_suite(name: str, out: Path, device: str | None = None, cases: list[str] | None = None,
              quiet: bool = False, sources: Any = None) -> Path:
    """Run the suite ``name`` (or only ``cases`` of it) and return the path of its result JSON."""
    suite = load_suite(name)
    device = device or suite.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"suite {suite.name!r} runs on {device!r} but no CUDA device is available; "
                         "pass --device cpu (with a tiny model shape) to check it")
    todo = list(suite.cases)
    if cases:
        names = [c.name for c in suite.cases]
        bad = [c for c in cases if c not in names]
        if bad:
            raise ValueError(f"suite {suite.name!r} has no case(s) {bad}; its cases: {names}")
        todo = [c for c in suite.cases if c.name in cases]
    out.mkdir(parents=True, exist_ok=True)
    path, records = out / f"{suite.name}.json", out / f"{suite.name}.records.jsonl"
    if device.startswith("cuda"):
        # cuDNN's SDPA builds an execution plan per new shape; a growing cache has a new shape every step
        torch.backends.cuda.enable_cudnn_sdp(False)
    ctx = Context(suite, device, out, records, quiet, sources)
    report: dict[str, Any] = {"suite": suite.name, "config": suite.as_dict(), "versions": versions(),
                              "device": device_info(device), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "records": records.name, "cases": ctx.results}

    def save() -> None:
        report["versions"] |= ctx.extra_versions
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")

    t0 = time.perf_counter()
    failed: list[str] = []
    for case in todo:
        t = time.perf_counter()
        ctx.results[case.name] = {"kind": case.kind, "settings": case.settings, "rows": []}
        try:
            ctx.results[case.name]["rows"] = KINDS[case.kind].run(ctx, case)
        except Exception as err:  # noqa: BLE001 - one failing case must not lose the others' measurements
            import traceback

            traceback.print_exc()
            ctx.results[case.name]["error"] = f"{type(err).__name__}: {err}"
            failed.append(case.name)
        ctx.results[case.name]["seconds"] = time.perf_counter() - t
        add_ratios(ctx.results)
        save()  # after every case: a run cut short keeps what it measured
    report["wall_s"] = time.perf_counter() - t0
    save()
    if not quiet:
        print(f"wrote {path}", flush=True)
    if failed:
        raise RuntimeError(f"suite {suite.name!r}: case(s) {failed} failed (their errors are in {path}); the other "
                           "cases' results are saved")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", nargs="?", help=f"suite name ({', '.join(suite_names())}) or a path to a .json")
    ap.add_argument("--out", help="output folder")
    ap.add_argument("--device", default=None, help="override the suite's device (e.g. cpu for a check)")
    ap.add_argument("--cases", default="", help="comma-separated case names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the suites and the case kinds")
    ap.add_argument("--check", action="store_true", help="load and validate every committed suite")
    args = ap.parse_args(argv)
    if args.list:
        for n in suite_names():
            s = load_suite(n)
            print(f"{n:24s} {len(s.cases):3d} cases  {s.description}")
        print("case kinds:", ", ".join(sorted(KINDS)))
        return 0
    if args.check:
        for n in suite_names():
            load_suite(n)
        print(f"{len(suite_names())} suites valid")
        return 0
    if not args.suite or not args.out:
        ap.error("give a SUITE and --out DIR (or --list / --check)")
    run_suite(args.suite, Path(args.out), args.device, [c for c in args.cases.split(",") if c])
    return 0


if __name__ == "__main__":
    sys.exit(main())
