"""The evaluation grid: every example under the full cache and under every method x allocation x budget cell.

Records go to ``<out>/results.jsonl``, one line per (cell, example), each with the cell's config and the package
versions. The grid is resumable: records already in the file are not recomputed (a finished cell costs nothing), and
a run whose task settings differ from the stored ``config.json`` is refused instead of mixing results.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ..generation import continuation_logprobs, greedy, prefill
from ..plan import Budget
from ..registry import make_allocation, make_channel, make_crosslayer, make_policy, policy_names
from ..spec import CacheSpec
from .ruler import string_match
from .scoring import contains_key, exact_match, first_answer_line, token_f1
from .tasks import Example, TaskOptions, parse_tasks

FULL = "full"


@dataclass(frozen=True)
class Cell:
    """One cache setup: ``method == "full"`` is the uncompressed ``DynamicCache``; ``channel``/``crosslayer`` name
    a channel / cross-layer method composed with the eviction policy (``"none"``: not used)."""

    method: str
    allocation: str = "-"
    budget: float = 1.0
    channel: str = "none"
    crosslayer: str = "none"

    @property
    def label(self) -> str:
        """The method as reports show it: the policy, then ``+crosslayer`` and ``+channel`` when used."""
        extras = [x for x in (self.crosslayer, self.channel) if x != "none"]
        return "+".join([self.method, *extras])

    @property
    def key(self) -> str:
        return FULL if self.method == FULL else f"{self.label}/{self.allocation}/{self.budget:g}"


@dataclass
class GridConfig:
    """What a grid evaluates; ``method_params`` maps a method to its parameters (defaults otherwise)."""

    model: str = "default"
    tasks: tuple[str, ...] = ("needle", "qa", "ppl")
    methods: tuple[str, ...] = ()
    allocations: tuple[str, ...] = ("uniform", "pyramid", "squeeze")
    budgets: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    allocation_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    channels: tuple[str, ...] = ("none",)
    crosslayers: tuple[str, ...] = ("none",)
    channel_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    crosslayer_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: label -> registered method, for several settings of one method in a grid: ``channels=("kivi2=kivi",
    #: "kivi4=kivi")`` is parsed by :meth:`validate` into labels ``kivi2``, ``kivi4`` (their parameters are given
    #: under the label: ``channel_params={"kivi4": {"bits": 4}}``)
    aliases: dict[str, str] = field(default_factory=dict)
    options: TaskOptions = field(default_factory=TaskOptions)
    device: str = "cpu"
    dtype: str = "float32"
    prefill_chunk: int | None = None  # compressed cells prefill in chunks of this many tokens (None: one pass)
    skip_infeasible: bool = False
    kvpress_python: str | None = None
    kvpress_presses: tuple[str, ...] = ("streamingllm", "snapkv", "pyramidkv", "observed", "expected")
    kvpress_full_check: bool = True  # also run the full cache under kvpress's transformers (identical-score check)
    #: evaluate the full cache (False: a shard of a grid whose full cache another shard evaluates)
    full_cell: bool = True
    #: only kvpress's presses (no squeezekv cell): a shard of a grid whose squeezekv cells other shards evaluate
    kvpress_only: bool = False

    def validate(self) -> None:
        """Every name and number checked before anything is loaded or computed."""
        parse_tasks(list(self.tasks))
        if not self.methods:
            self.methods = tuple(n for n in policy_names() if n != "none")
        self.channels = self._labels(self.channels)
        self.crosslayers = self._labels(self.crosslayers)
        for c in self.channels:
            if c != "none":
                make_channel(self.registered(c), **self.channel_params.get(c, {}))
        for x in self.crosslayers:
            if x != "none":
                make_crosslayer(self.registered(x), **self.crosslayer_params.get(x, {}))
        for kind, params, names in (("channel", self.channel_params, self.channels),
                                    ("cross-layer", self.crosslayer_params, self.crosslayers)):
            extra = sorted(set(params) - set(names))
            if extra:
                raise ValueError(f"parameters given for {kind} method {extra[0]!r}, which is not in the grid {names}")
        if "none" in self.methods and self.channels == ("none",) and self.crosslayers == ("none",):
            raise ValueError("method 'none' (no eviction) needs a channel or cross-layer method: "
                             "alone it is the full cache, which the grid always evaluates")
        for m in self.methods:
            make_policy(m, **self.method_params.get(m, {}))
        for a in self.allocations:
            make_allocation(a, **self.allocation_params.get(a, {}))
        unknown = sorted(set(self.method_params) - set(self.methods))
        if unknown:
            raise ValueError(f"parameters given for method {unknown[0]!r}, which is not in the grid {self.methods}")
        if not self.budgets:
            raise ValueError("no budget given: give fractions in (0, 1)")
        for b in self.budgets:
            parsed = Budget.parse(b)
            if not parsed.is_fraction or parsed.value >= 1.0:
                raise ValueError(
                    f"budget {b!r} is out of range: the eval grid takes fractions of the prompt in (0, 1) "
                    "(the full cache is always evaluated)"
                )
        if self.prefill_chunk is not None and (not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1):
            raise ValueError(f"prefill_chunk={self.prefill_chunk!r} is out of range: must be an integer >= 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} is not supported: choose float32, bfloat16 or float16")
        self.options.validate()
        from .kvpress_side import validate as validate_kvpress

        validate_kvpress(self.kvpress_python, tuple(self.kvpress_presses))
        if self.kvpress_only and not self.kvpress_python:
            raise ValueError("kvpress_only (--kvpress-only) needs kvpress's python (--kvpress-python): "
                             "without it the grid has nothing to evaluate")

    def _labels(self, entries: tuple[str, ...]) -> tuple[str, ...]:
        """``"label=method"`` entries -> labels (recorded in :attr:`aliases`); plain names stay as they are."""
        out = []
        for entry in tuple(entries) or ("none",):
            label, sep, name = (t.strip() for t in entry.partition("="))
            if sep:
                if not label or not name or label == "none":
                    raise ValueError(f"{entry!r} must look like label=method (e.g. kivi4=kivi)")
                if self.aliases.get(label, name) != name:
                    raise ValueError(f"label {label!r} names both {self.aliases[label]!r} and {name!r}")
                self.aliases[label] = name
            if label in out:
                raise ValueError(f"{label!r} is given twice")
            out.append(label)
        return tuple(out)

    def registered(self, label: str) -> str:
        """The registered method a channel/cross-layer label stands for."""
        return self.aliases.get(label, label)

    def fingerprint(self) -> str:
        """Hash of what decides an example's content and a record's meaning (model, task options, params)."""
        options = asdict(self.options)
        if "ruler" not in self.tasks:  # absent when unused: grids without RULER keep their fingerprint
            options = {k: v for k, v in options.items() if not k.startswith("ruler_")}
        params = {"model": self.model, "options": options, "method_params": self.method_params,
                  "allocation_params": self.allocation_params}
        if self.channel_params or self.crosslayer_params:  # absent when unused: older grids keep their fingerprint
            params.update(channel_params=self.channel_params, crosslayer_params=self.crosslayer_params)
        if self.aliases:
            params["aliases"] = self.aliases
        if self.prefill_chunk is not None:
            params["prefill_chunk"] = self.prefill_chunk
        blob = json.dumps(params, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def cells(self) -> list[Cell]:
        if self.kvpress_only:
            return []
        out = [Cell(FULL)] if self.full_cell else []
        for x in self.crosslayers:
            for c in self.channels:
                for m in self.methods:
                    if m == "none":  # no eviction: budget and allocation do not apply
                        if (x, c) != ("none", "none"):
                            out.append(Cell(m, "-", 1.0, c, x))
                        continue
                    for a in self.allocations:
                        for b in self.budgets:
                            out.append(Cell(m, a, float(b), c, x))
        return out

    def spec(self, cell: Cell) -> CacheSpec | None:
        """The :class:`CacheSpec` of a compressed cell (None for the full cache): what its records save and what
        builds its caches."""
        if cell.method == FULL:
            return None
        allocation = "uniform" if cell.allocation == "-" else cell.allocation
        extra = {}
        for kind, name, params in (("channel", cell.channel, self.channel_params),
                                   ("crosslayer", cell.crosslayer, self.crosslayer_params)):
            if name != "none":
                extra[kind], extra[f"{kind}_params"] = self.registered(name), params.get(name, {})
        return CacheSpec(method=cell.method, budget=cell.budget, allocation=allocation,
                         method_params=self.method_params.get(cell.method, {}),
                         allocation_params=self.allocation_params.get(allocation, {}),
                         prefill_chunk=self.prefill_chunk, **extra)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fingerprint"] = self.fingerprint()
        return d


def versions() -> dict[str, str]:
    """Package versions and machine, stored with every record."""
    import transformers

    from .. import __version__

    return {"squeezekv": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.platform()}


def min_layer_budget(cell: Cell, cfg: GridConfig, prompt_len: int, num_layers: int) -> int:
    """A lower bound of the smallest layer budget the cell's plan gives a prompt of ``prompt_len`` tokens."""
    base = Budget.parse(cell.budget).tokens(prompt_len)
    alloc = make_allocation(cell.allocation, **cfg.allocation_params.get(cell.allocation, {}))
    if getattr(alloc, "needs_importance", False):
        return max(1, int(float(getattr(alloc, "p", 1.0)) * base))
    budgets, _ = alloc.allocate(base, num_layers, None)
    return min(budgets)


def feasible_cells(cfg: GridConfig, examples: list[Example], num_layers: int) -> tuple[list[Cell], list[str]]:
    """Cells whose every layer budget reaches the policy's minimum on the shortest prompt; reasons for the others."""
    shortest = min(len(e.prompt) for e in examples)
    ok, reasons = [], []
    for cell in cfg.cells():
        if cell.method in (FULL, "none"):
            ok.append(cell)
            continue
        need = make_policy(cell.method, **cfg.method_params.get(cell.method, {})).min_budget()
        low = min_layer_budget(cell, cfg, shortest, num_layers)
        if low < need:
            reasons.append(f"{cell.key}: a layer would get {low} tokens on the shortest prompt ({shortest} tokens), "
                           f"below the {need} that {cell.method} needs")
        else:
            ok.append(cell)
    return ok, reasons


def interleave_tasks(examples: list[Example]) -> list[Example]:
    """Round-robin over tasks (needle, qa, ppl, needle, ...), and within RULER over its subsets (``4k/niah_single_1``,
    ``4k/niah_single_2``, ...), each group's examples in their order: a partial grid covers every task and subtask."""
    by_task: dict[str, list[Example]] = {}
    for e in examples:
        by_task.setdefault(e.task if e.task != "ruler" else f"ruler:{e.subset}", []).append(e)
    out: list[Example] = []
    queues = list(by_task.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record in a results.jsonl (a torn last line from an interrupted run is ignored)."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _factory(model: Any, cell: Cell, cfg: GridConfig):
    from transformers import DynamicCache

    from .. import dynamic_cache_nbytes, make_cache

    spec = cfg.spec(cell)
    if spec is None:
        return (lambda: DynamicCache(config=model.config)), dynamic_cache_nbytes
    return (lambda: make_cache(model, spec),
            lambda c: c.nbytes())


@torch.no_grad()
def generate(model: Any, prompt: list[int], factory: Any, nbytes: Any, max_new_tokens: int, eos: set[int],
             device: str, chunk: int | None = None) -> tuple[list[int], int]:
    """Greedy answer tokens (the end-of-sequence token not included) on a fresh cache of ``factory`` and the KV
    bytes held after the prefill (in chunks of ``chunk`` tokens when given)."""
    cache = factory()
    logits = prefill(model, prompt, cache, device, chunk)  # [1, vocab]
    held = nbytes(cache)
    return greedy(model, cache, logits, max_new_tokens, eos, device), held


@torch.no_grad()
def continuation_nll(model: Any, prefix: list[int], continuation: list[int], factory: Any, nbytes: Any,
                     device: str, chunk: int | None = None) -> tuple[float, int]:
    """Mean negative log-likelihood per token of ``continuation`` after the compressed ``prefix`` (the prefix is
    compressed once after its prefill; the continuation then goes through in one forward pass:
    :func:`squeezekv.generation.continuation_logprobs`), and the KV bytes held after the prefill."""
    cache = factory()
    logits = prefill(model, prefix, cache, device, chunk)  # [1, vocab]
    held = nbytes(cache)
    nll = -continuation_logprobs(model, cache, logits, continuation, device)  # [len(continuation)]
    return float(nll.mean()), held


def score(example: Example, answer: str | None, nll: float | None) -> dict[str, float]:
    """The example's metrics (see :data:`squeezekv.eval.tasks.TASKS`)."""
    if example.task == "needle":
        return {"retrieval": contains_key(answer or "", example.meta["key"])}
    if example.task == "qa":
        line = first_answer_line(answer or "")
        keep_articles = not example.meta.get("options", False)
        return {"f1": token_f1(line, example.meta["answers"], keep_articles),
                "em": exact_match(line, example.meta["answers"], keep_articles)}
    if example.task == "ppl":
        return {"nll": float(nll)}
    if example.task == "ruler":
        return {"ruler": string_match(answer, example.meta["references"], example.meta["metric"])}
    raise ValueError(f"no scorer for task {example.task!r}")


def stop_tokens(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end an answer: the tokenizer's end-of-sequence token and the generation config's (a chat
    model such as Qwen2.5-Instruct ends its turn with ``<|im_end|>``, which may not be the tokenizer's EOS)."""
    out = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    ids = getattr(gen, "eos_token_id", None) if gen is not None else None
    out.update([ids] if isinstance(ids, int) else list(ids or []))
    return out


def run_grid(cfg: GridConfig, model: Any, tokenizer: Any, examples: list[Example], out_dir: Path,
             progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate every pending (cell, example) and append its record; returns all records of this grid."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "config.json"
    if cfg_path.exists():
        stored = json.loads(cfg_path.read_text())
        if stored.get("fingerprint") != cfg.fingerprint():
            raise ValueError(
                f"{out_dir} holds results of other settings (fingerprint {stored.get('fingerprint')} vs "
                f"{cfg.fingerprint()}: model, task options or method parameters differ); use another --out"
            )
        # a resumed run may add methods, allocations or budgets: the stored config lists their union
        for key in ("tasks", "methods", "allocations", "budgets", "kvpress_presses", "channels", "crosslayers"):
            cfg_union = list(dict.fromkeys(list(stored.get(key, [])) + list(getattr(cfg, key))))
            stored[key] = cfg_union
        merged = stored
    else:
        merged = cfg.as_dict()
    num_layers = model.config.get_text_config().num_hidden_layers
    cells, infeasible = feasible_cells(cfg, examples, num_layers)
    if infeasible and not cfg.skip_infeasible:
        raise ValueError("cells the policies cannot run (raise the budget, or pass --skip-infeasible):\n  "
                         + "\n  ".join(infeasible))
    merged["skipped_cells"] = sorted(set(merged.get("skipped_cells", [])) | set(infeasible))
    merged["versions"] = versions()
    cfg_path.write_text(json.dumps(merged, indent=2, default=str))

    results = out_dir / "results.jsonl"
    done = {(r["cell"], r["example_id"]) for r in read_records(results)}
    # example by example (every cell of one example, then the next): an interrupted grid leaves every cell with the
    # same examples, so its partial results are still paired comparisons
    todo = [(c, e) for e in interleave_tasks(examples) for c in cells if (c.key, e.id) not in done]
    eos = stop_tokens(model, tokenizer)
    vers = versions()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="eval", unit="run", dynamic_ncols=True)
    with open(results, "a", encoding="utf-8") as fh:
        for cell, ex in todo:
            if bar is not None:
                bar.set_postfix_str(f"{cell.key} {ex.task}", refresh=False)
            factory, nbytes = _factory(model, cell, cfg)
            chunk = None if cell.method == FULL else cfg.prefill_chunk  # the full cache prefills in one pass
            t0 = time.perf_counter()
            answer = nll = None
            if ex.kind == "generate":
                toks, held = generate(model, list(ex.prompt), factory, nbytes, ex.max_new_tokens, eos, cfg.device,
                                      chunk)
                answer = tokenizer.decode(toks, skip_special_tokens=True).strip()
            else:
                nll, held = continuation_nll(model, list(ex.prompt), list(ex.continuation), factory, nbytes,
                                             cfg.device, chunk)
            rec = {
                "cell": cell.key, "method": cell.label, "allocation": cell.allocation, "budget": cell.budget,
                "policy": cell.method, "channel": cell.channel, "crosslayer": cell.crosslayer,
                "task": ex.task, "subset": ex.subset, "example_id": ex.id, "meta": ex.meta,
                "prompt_tokens": len(ex.prompt), "answer": answer, "scores": score(ex, answer, nll),
                "kv_bytes_after_prefill": held, "seconds": time.perf_counter() - t0,
                "config": {"model": cfg.model, "fingerprint": cfg.fingerprint(),
                           "method_params": cfg.method_params.get(cell.method, {}),
                           "channel_method": cfg.registered(cell.channel),
                           "channel_params": cfg.channel_params.get(cell.channel, {}),
                           "crosslayer_method": cfg.registered(cell.crosslayer),
                           "crosslayer_params": cfg.crosslayer_params.get(cell.crosslayer, {}),
                           "allocation_params": cfg.allocation_params.get(cell.allocation, {}),
                           "device": cfg.device, "dtype": str(next(model.parameters()).dtype),
                           "prefill_chunk": chunk,
                           "cache": None if cfg.spec(cell) is None else cfg.spec(cell).to_dict()},
                "versions": vers,
            }
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if cfg.kvpress_python:
        from ..assets import resolve_model
        from .kvpress_side import run as run_kvpress

        done = {(r["cell"], r["example_id"]) for r in read_records(results)}
        base = {"config": {"model": cfg.model, "fingerprint": cfg.fingerprint(), "device": cfg.device,
                           "dtype": f"torch.{cfg.dtype}"}}
        run_kvpress(cfg.kvpress_python, resolve_model(cfg.model), tuple(cfg.kvpress_presses),
                    tuple(cfg.budgets), interleave_tasks(examples), done, score, base, results,
                    device=cfg.device, full_check=cfg.kvpress_full_check, dtype=cfg.dtype)
    return read_records(results)


def nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def records_by(records: Iterable[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out
