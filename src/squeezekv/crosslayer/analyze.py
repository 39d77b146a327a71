"""Which layers may share attention weights: ``squeezekv analyze-layers``.

Shared Attention (Liao & Vargas 2024, arXiv 2407.12866) picks its spans from the similarity of the layers'
post-softmax attention weights on sample text. This module measures, on *calibration* text (by default the GNU GPL v3
text shipped with Debian in ``/usr/share/common-licenses``; never the essays, kernel documentation or QA passages the
eval harness scores on):

* ``similarity[i][j]``: cosine similarity between layer ``i``'s and layer ``j``'s attention maps ``[q, n]`` (each
  head's map flattened, the query heads compared head by head), averaged over heads and calibration windows — the
  paper's measure of attention "isotropy" across layers;
* ``js_divergence[i][j]``: Jensen-Shannon divergence (bits, in [0, 1]) between the two layers' attention
  distributions of the same query, averaged over queries, heads and windows.

A span ``[first, last]`` is proposed where every layer of it has ``similarity[first][l] >= threshold`` (greedy, from
the first layer on); ``spans_by_count[k]`` proposes spans that share exactly ``k`` layers, picking the most similar
layers first. The JSON it writes is accepted by ``shared_attention``'s ``spans`` parameter.

Weights are captured with transformers' eager attention and ``output_attentions=True`` (the model's implementation
is restored afterwards); matplotlib (an optional extra) draws the heat map.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

#: default calibration text: prose that none of the eval tasks uses
DEFAULT_CALIBRATION = Path("/usr/share/common-licenses/GPL-3")


def calibration_text(path: str | Path | None = None) -> str:
    """The calibration text (``path`` or :data:`DEFAULT_CALIBRATION`)."""
    p = Path(path) if path is not None else DEFAULT_CALIBRATION
    if not p.is_file():
        raise FileNotFoundError(
            f"calibration text {str(p)!r} not found: pass --calibration-file with some long English text "
            "(not the evaluation essays or kernel documentation)"
        )
    return p.read_text(encoding="utf-8", errors="replace")


def calibration_windows(tokenizer: Any, text: str, tokens: int, samples: int) -> list[list[int]]:
    """``samples`` consecutive, non-overlapping windows of ``tokens`` token ids from ``text``."""
    if tokens < 8 or samples < 1:
        raise ValueError(f"tokens={tokens} / samples={samples} out of range: need tokens >= 8 and samples >= 1")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < tokens * samples:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than {samples} x {tokens}: lower "
                         "--tokens/--samples or give a longer --calibration-file")
    return [ids[k * tokens:(k + 1) * tokens] for k in range(samples)]


@torch.no_grad()
def attention_maps(model: Any, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Post-softmax attention weights of every layer, ``[B, Hq, T, T]`` each (eager attention, float32)."""
    original = getattr(model.config, "_attn_implementation", None) or "sdpa"
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=input_ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(original)
    if out.attentions is None or any(a is None for a in out.attentions):
        raise ValueError("the model returned no attention weights with output_attentions=True")
    return [a.float() for a in out.attentions]


def _js_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits between distributions along the last dim (0 log 0 = 0)."""
    m = 0.5 * (p + q)
    kl_pm = torch.special.xlogy(p, p).sum(-1) - torch.special.xlogy(p, m).sum(-1)
    kl_qm = torch.special.xlogy(q, q).sum(-1) - torch.special.xlogy(q, m).sum(-1)
    return (0.5 * (kl_pm + kl_qm) / math.log(2)).clamp_min(0.0)


def pairwise(maps: Sequence[torch.Tensor], js_rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(similarity, js)`` ``[L, L]`` of one window's maps (``L`` tensors ``[B, Hq, T, T]``). The JS divergence is
    averaged over ``js_rows`` query rows evenly spaced over the window (an estimate of the mean over all rows; the
    cosine similarity uses every entry)."""
    stacked = torch.stack([m.flatten(2) for m in maps])  # [L, B, Hq, T*T]
    unit = torch.nn.functional.normalize(stacked, dim=-1)
    sim = torch.einsum("ibhx,jbhx->ijbh", unit, unit).mean(dim=(2, 3))  # [L, L]
    t = maps[0].shape[-2]
    rows = torch.linspace(0, t - 1, min(js_rows, t)).round().long().to(maps[0].device)
    sub = torch.stack([m[:, :, rows] for m in maps])  # [L, B, Hq, R, T]
    n = len(maps)
    js = torch.zeros(n, n)
    for i in range(n - 1):
        d = _js_bits(sub[i:i + 1], sub[i + 1:]).mean(dim=(1, 2, 3)).cpu()  # [L - i - 1]
        js[i, i + 1:] = d
        js[i + 1:, i] = d
    return sim, js


def propose_spans(sim: Sequence[Sequence[float]], threshold: float) -> list[list[int]]:
    """Greedy spans of consecutive layers whose similarity to the span's first layer is >= ``threshold`` (spans of
    one layer are left out)."""
    n = len(sim)
    spans, first = [], 0
    while first < n:
        last = first
        while last + 1 < n and sim[first][last + 1] >= threshold:
            last += 1
        if last > first:
            spans.append([first, last])
        first = last + 1
    return spans


def spans_for_count(sim: Sequence[Sequence[float]], count: int) -> list[list[int]]:
    """Spans that share exactly ``count`` layers: lower the threshold over the observed similarities until the greedy
    proposal shares at least ``count`` layers, then drop the least similar span ends until it shares ``count``."""
    n = len(sim)
    if not 0 <= count <= n - 1:
        raise ValueError(f"cannot share {count} layers of a {n}-layer model (0..{n - 1})")
    if count == 0:
        return []
    for t in sorted({float(sim[i][j]) for i in range(n) for j in range(i + 1, n)}, reverse=True):
        spans = propose_spans(sim, t)
        if sum(b - a for a, b in spans) >= count:
            break
    while sum(b - a for a, b in spans) > count:
        k = min(range(len(spans)), key=lambda s: sim[spans[s][0]][spans[s][1]])
        spans[k][1] -= 1
        spans = [s for s in spans if s[1] > s[0]]
    return spans


def analyze_layers(model: Any, tokenizer: Any, text: str, *, tokens: int = 512, samples: int = 4,
                   threshold: float = 0.9, counts: Sequence[int] = (2, 4, 8, 12, 16), progress: bool = True
                   ) -> dict[str, Any]:
    """Measure the layer-by-layer similarity of attention weights on ``samples`` windows of ``tokens`` tokens of
    ``text`` and propose spans. Returns the JSON-ready report."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} is out of range: must be in (0, 1]")
    from tqdm.auto import tqdm

    windows = calibration_windows(tokenizer, text, tokens, samples)
    device = next(model.parameters()).device
    sim_sum, js_sum = None, None
    for ids in tqdm(windows, desc="calibration windows", unit="window", disable=not progress):
        sim, js = pairwise(attention_maps(model, torch.tensor([ids], device=device)))
        sim_sum = sim.cpu() if sim_sum is None else sim_sum + sim.cpu()
        js_sum = js if js_sum is None else js_sum + js
    sim = (sim_sum / len(windows)).tolist()
    js = (js_sum / len(windows)).tolist()
    n = len(sim)
    adjacent = [sim[i][i + 1] for i in range(n - 1)]
    return {
        "model": Path(getattr(model.config, "_name_or_path", "") or model.config.model_type).name,
        "layers": n,
        "measure": "cosine similarity of per-head post-softmax attention maps (mean over heads and windows); "
                   "Jensen-Shannon divergence in bits per query row (mean over queries, heads and windows)",
        "calibration": {"tokens": tokens, "samples": samples},
        "threshold": threshold,
        "similarity": [[round(x, 5) for x in row] for row in sim],
        "js_divergence": [[round(x, 5) for x in row] for row in js],
        "adjacent_similarity": [round(x, 5) for x in adjacent],
        "spans": propose_spans(sim, threshold),
        "spans_by_count": {str(c): spans_for_count(sim, c) for c in counts if c <= n - 1},
    }


def plot_heatmap(report: dict[str, Any], path: str | Path) -> Path:
    """Heat maps of the similarity and the JS divergence, proposed spans outlined; PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError as err:  # pragma: no cover - optional extra
        raise ValueError("the heat map needs matplotlib (pip install 'squeezekv[plots]' or matplotlib)") from err
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    panels = (("similarity", "cosine similarity of attention maps", "viridis"),
              ("js_divergence", "Jensen-Shannon divergence (bits)", "magma_r"))
    for ax, (key, title, cmap) in zip(axes, panels):
        im = ax.imshow(report[key], cmap=cmap, origin="upper")
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        for a, b in report["spans"]:
            ax.add_patch(Rectangle((a - 0.5, a - 0.5), b - a + 1, b - a + 1, fill=False, edgecolor="red", lw=1.5))
    fig.suptitle(f"{report['model']}: attention-weight similarity across layers "
                 f"({report['calibration']['samples']} x {report['calibration']['tokens']} calibration tokens; "
                 f"red: spans at threshold {report['threshold']})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
