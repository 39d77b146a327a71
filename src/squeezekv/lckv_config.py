"""What ``squeezekv train-lckv`` trains (:class:`TrainConfig`), in a module that imports neither torch nor
transformers, so that the command's ``--help`` (one flag per field) is instant; the training itself is
:func:`squeezekv.crosslayer.lckv.train.train`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    """Everything a run needs; JSON files map onto these fields (:meth:`from_json`)."""

    out_dir: str = "runs/lckv"
    data_dir: str = "runs/data"
    sources: list[str] = field(default_factory=lambda: ["essays"])
    tokenizer: str = "bytes"
    max_chars: int | None = None  # cap on text read per source (tiny runs)
    init: str = "scratch"  # "scratch", "default" or a local Llama checkpoint folder
    layout: str = "top"  # standard | top | sandwich (configuration.make_kv_sources)
    warmup_layers: int = 2
    forward_passes: int = 7  # paper's m
    backward_passes: int = 2  # paper's b
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_steps: int = 1000
    time_budget_s: float | None = None  # stop early once this much training time has passed (whole run, resumes too)
    eval_every: int = 0  # 0: only at the end
    eval_windows: int = 64
    save_every: int = 200
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # autocast dtype: bfloat16 on CUDA, float32 on CPU

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        data = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(data) - names)
        if bad:
            raise ValueError(f"{path}: unknown training option(s) {bad}; known: {sorted(names)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "num_layers", "eval_windows", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
