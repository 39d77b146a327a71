"""Quality evaluation harness (``squeezekv eval``): tasks from offline data, scoring, a resumable grid over
method x allocation x budget, and a report (CSV, PNG plots, HTML).

Modules: :mod:`.data` (offline sources), :mod:`.tasks` (examples; the needle prompt ``squeezekv run`` uses too),
:mod:`.scoring` (metrics, bootstrap), :mod:`.grid` (the resumable runner; its loops are
:mod:`squeezekv.generation`'s), :mod:`.report` (summary, plots, HTML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import Sources
from .grid import Cell, GridConfig, run_grid
from .report import write_report
from .tasks import TASKS, Example, TaskOptions, build_examples


def prepare_sources(cfg: GridConfig, sources: Sources | None = None) -> Sources:
    """Load (or prepare, once) every text the grid's tasks need; raises before any model is loaded if one is missing."""
    sources = sources or Sources()
    if "needle" in cfg.tasks:
        sources.get_essays()
    if "qa" in cfg.tasks:
        sources.get_qa()
    if "ruler" in cfg.tasks:
        sources.get_ruler()
    if "ppl" in cfg.tasks:
        for name in cfg.options.ppl_sources:
            sources.get_docs(name)
    return sources


def evaluate(cfg: GridConfig, out_dir: str | Path, *, sources: Sources | None = None,
             loaded: tuple[Any, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Validate, prepare the data, load the model, run the pending grid cells, write the report."""
    cfg.validate()
    sources = prepare_sources(cfg, sources)
    if loaded is None:
        import torch

        from ..assets import load_model

        loaded = load_model(cfg.model, device=cfg.device, dtype=getattr(torch, cfg.dtype))
    model, tokenizer = loaded
    from ..models import arch_spec

    arch_spec(model.config)
    examples = build_examples(list(cfg.tasks), tokenizer, sources, cfg.options)
    out = Path(out_dir)
    run_grid(cfg, model, tokenizer, examples, out, progress=progress)
    return write_report(out)


__all__ = ["Cell", "Example", "GridConfig", "Sources", "TASKS", "TaskOptions", "build_examples", "evaluate",
           "prepare_sources", "run_grid", "write_report"]
