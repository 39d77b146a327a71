"""Calibration for Eigen Attention (:mod:`squeezekv.channel.eigen`): run the model on text, accumulate per layer and
KV head the Gram matrices of pre-RoPE keys, post-RoPE keys + queries, and values, and save their eigenbases.

The activations are read by an attention function registered in transformers' ``AttentionInterface`` for the
duration of the run (no model code is touched): it receives the rotated queries/keys and the values exactly as the
cached attention will, un-rotates the keys with the model's rotary module, adds ``XᵀX`` to float64 accumulators and
returns ordinary causal SDPA. Only ``[D, D]`` matrices are kept, so the number of calibration tokens costs time, not
memory.

Text (default): Linux kernel documentation pages shorter than the 20,000 characters the evaluation's perplexity
task requires (:func:`squeezekv.eval.data.load_linux_docs`), so no evaluated document is seen by the calibration;
the needle task's essays are not used either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..attention_math import sdpa
from ..eval.data import EVAL_MIN_CHARS  # the evaluation's pages are at least this long; calibration reads shorter
from .eigen import FORMAT, RotaryTable, model_shape, select_rank, unapply_rope

CALIB_ATTN = "squeezekv_eigen_calibration"


def calibration_texts(min_chars: int = 4000, max_chars: int = EVAL_MIN_CHARS, root: Path | None = None
                      ) -> list[tuple[str, str]]:
    """``[(relative path, text)]`` of English Linux kernel documentation pages with ``min_chars <= len <
    max_chars`` (sorted): pages the evaluation never reads."""
    from ..eval.data import load_linux_docs

    return load_linux_docs(root, min_chars, max_chars, missing_hint="or pass --text-file")


def calibration_sequences(tokenizer: Any, texts: list[tuple[str, str]], tokens: int, seq_len: int
                          ) -> list[list[int]]:
    """``tokens`` tokens of ``texts`` as sequences of at most ``seq_len`` tokens: the opening of evenly spaced texts
    (one sequence each while there are more texts than sequences, else several per text), so that a small budget
    still spans the whole collection. Pieces shorter than ``seq_len // 4`` are skipped."""
    if tokens < 1 or seq_len < 2:
        raise ValueError(f"tokens={tokens!r} and seq_len={seq_len!r} must be >= 1 and >= 2")
    n_seq = -(-tokens // seq_len)
    per_text = 1 if len(texts) >= n_seq else -(-n_seq // max(1, len(texts)))
    step = max(1, len(texts) // n_seq)
    order = [t for k in range(step) for t in texts[k::step]]
    seqs: list[list[int]] = []
    total = 0
    for _, text in order:
        ids = list(tokenizer(text[: seq_len * per_text * 12], add_special_tokens=False)["input_ids"])
        for start in range(0, min(len(ids), per_text * seq_len), seq_len):
            piece = ids[start:start + seq_len][: tokens - total]
            if len(piece) < max(2, min(seq_len // 4, tokens - total)):
                break
            seqs.append(piece)
            total += len(piece)
            if total >= tokens:
                return seqs
    if not seqs:
        raise ValueError("no calibration text long enough")
    return seqs


class _Recorder:
    """Accumulates ``XᵀX`` per layer and KV head (float64): keys before RoPE, keys after RoPE + the queries of the
    head's group, values."""

    def __init__(self, model: Any):
        shape = model_shape(model.config)
        self.shape = shape
        l, h, d = shape["num_layers"], shape["num_kv_heads"], shape["head_dim"]
        self.grams = {name: torch.zeros((l, h, d, d), dtype=torch.float64) for name in ("key_pre", "key_post", "value")}
        self.rotary = RotaryTable(model)
        self.tokens = 0

    @staticmethod
    def _gram(x: torch.Tensor) -> torch.Tensor:
        # x: [B, H, n, D] -> [H, D, D]
        x = x.float()
        return torch.einsum("bhnd,bhne->hde", x, x).double().cpu()

    def attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
        i = module.layer_idx
        b, hq, n, d = query.shape
        h = key.shape[1]
        pos = kwargs.get("position_ids")
        pos = torch.arange(n, device=key.device)[None] if pos is None else pos.to(key.device)
        cos, sin = self.rotary.cos_sin(pos.expand(b, n), i)
        self.grams["key_pre"][i] += self._gram(unapply_rope(key.float(), cos[:, None], sin[:, None]))
        qg = query.float().reshape(b, h, hq // h * n, d)  # the queries of a KV head's group as extra rows
        self.grams["key_post"][i] += self._gram(key) + self._gram(qg)
        self.grams["value"][i] += self._gram(value)
        if i == 0:
            self.tokens += b * n
        out = sdpa(query, key, value, None, query.shape[-1] ** -0.5 if scaling is None else scaling)
        return out.transpose(1, 2).contiguous(), None

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, gram in self.grams.items():
            lam, vec = torch.linalg.eigh(gram)  # ascending
            out[name] = {"basis": vec.flip(-1).float().contiguous(), "eigenvalues": lam.flip(-1).clamp_min(0.0)}
        return out


@torch.no_grad()
def calibrate(model: Any, sequences: list[list[int]], progress: Callable[[int], None] | None = None,
              source: str = "") -> dict[str, Any]:
    """Run ``model`` over ``sequences`` (one at a time, no cache) and return the calibration state (what
    :func:`save` writes and :class:`~squeezekv.channel.eigen.EigenAttention` loads)."""
    from ..attention import squeezekv_mask
    from ..models import arch_spec

    arch_spec(model.config)  # an unsupported model: the architecture error, before any calibration work
    rec = _Recorder(model)
    AttentionInterface.register(CALIB_ATTN, rec.attention)
    AttentionMaskInterface.register(CALIB_ATTN, squeezekv_mask)
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    device = next(model.parameters()).device
    model.set_attn_implementation(CALIB_ATTN)
    try:
        for seq in sequences:
            model(input_ids=torch.tensor([seq], device=device), use_cache=False)
            if progress is not None:
                progress(len(seq))
    finally:
        model.set_attn_implementation(previous)
    state = {
        "format": FORMAT,
        "model": {**rec.shape, "name": str(getattr(model.config, "_name_or_path", ""))},
        "calibration": {"tokens": rec.tokens, "sequences": len(sequences),
                        "max_seq_len": max(len(s) for s in sequences), "source": source},
    }
    state.update(rec.result())
    return state


def save(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def rank_report(state: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Per-layer ranks (max over KV heads) at ``threshold`` for each basis, and K+V elements per token."""
    d = state["model"]["head_dim"]
    h = state["model"]["num_kv_heads"]
    ranks = {name: [int(r) for r in select_rank(state[name]["eigenvalues"], threshold).amax(-1)]
             for name in ("key_pre", "key_post", "value")}
    full = 2 * d * h * len(ranks["value"])
    rep = {"threshold": threshold, "head_dim": d, "ranks": ranks, "full_elements_per_token": full}
    for mode, key in (("pre", "key_pre"), ("post", "key_post")):
        elems = h * sum(k + v for k, v in zip(ranks[key], ranks["value"]))
        rep[f"elements_per_token_{mode}"] = elems
        rep[f"fraction_of_full_{mode}"] = elems / full
    return rep

