"""squeezekv caches under transformers' own tensor parallelism (one model sharded over several processes).

transformers shards a model with ``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))`` under
``torchrun`` (NCCL on GPUs, gloo on CPUs): ``k_proj``/``v_proj`` are column-parallel, so each rank's attention computes
and caches only its own ``num_key_value_heads / N`` KV heads, and ``o_proj``/``down_proj`` are row-parallel with an
all-reduce, so the residual stream (hidden states) is replicated on every rank.

What that means for a :class:`~squeezekv.SqueezeCache` (one per rank, built by :func:`squeezekv.make_cache` on each
rank's shard of the model):

* every layer holds ``[B, H / N, n, D]``: its rank's KV heads, nothing else;
* token positions, ``get_seq_length()`` and the budget plan come from replicated data (the prompt, the padding mask),
  so they agree by construction (:func:`check_agreement` verifies it);
* eviction policies choose per (batch row, KV head) (window, StreamingLLM, H2O, SnapKV): local by construction, each
  rank keeps exactly the tokens the unsharded model keeps for the same heads;
* SqueezeAttention's layer importances come from replicated hidden states; before they set the budgets the ranks
  compare them (one ``all_gather`` of ``L`` floats per prompt) and every rank uses rank 0's values, so the plans agree
  even if a backend's all-reduce were not bit-identical across ranks; the largest difference seen is recorded in the
  plan's details (``tp_importance_max_diff``, 0.0 when the hidden states are exactly replicated);
* channel methods with per-KV-head tables calibrated on the unsharded model (``coupled`` codebooks, ``eigen`` bases)
  keep the rows of their rank's heads (:meth:`squeezekv.channel.base.ChannelMethod.shard_heads`); ``kivi`` has no
  tables; ``coupled`` (which never calibrates inside ``make_cache``) needs ``calibration=FILE`` made unsharded;
* the cross-layer methods (``minicache``, ``shared_attention``) work per KV head and need nothing;
* bytes: ``cache.nbytes()`` is this rank's; :func:`total_nbytes` / :func:`nbytes_per_rank` all-reduce / all-gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # pragma: no cover
    from .cache import SqueezeCache


@dataclass(frozen=True)
class TensorParallel:
    """Where this rank sits in the model's tensor-parallel group: ``rank`` of ``size`` ranks in ``group``, holding
    KV heads ``[head_start, head_start + local_kv_heads)`` of the model's ``kv_heads``."""

    group: Any  # torch.distributed.ProcessGroup
    rank: int
    size: int
    kv_heads: int

    @property
    def local_kv_heads(self) -> int:
        return self.kv_heads // self.size

    @property
    def head_start(self) -> int:
        return self.rank * self.local_kv_heads

    @property
    def head_stop(self) -> int:
        return self.head_start + self.local_kv_heads

    def agree(self, what: str, values: Sequence[float]) -> tuple[list[float], float]:
        """``values`` (same length on every rank) gathered from every rank: returns rank 0's and the largest absolute
        difference between any rank's and rank 0's (0.0 = identical everywhere). One ``all_gather``."""
        local = torch.tensor([float(v) for v in values], dtype=torch.float64)  # [L]
        count = torch.tensor([local.numel()], dtype=torch.int64)
        counts = [torch.zeros_like(count) for _ in range(self.size)]
        dist.all_gather(counts, count, group=self.group)
        if len({int(c) for c in counts}) != 1:
            raise RuntimeError(
                f"ranks of the tensor-parallel group disagree on the number of {what} values: "
                f"{[int(c) for c in counts]} (every rank must run the same prompt through the same model)"
            )
        gathered = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(gathered, local, group=self.group)
        stacked = torch.stack(gathered)  # [size, L]
        diff = float((stacked - stacked[0]).abs().max()) if local.numel() else 0.0
        return [float(v) for v in stacked[0]], diff


def tensor_parallel(model: Any) -> TensorParallel | None:
    """The model's tensor-parallel placement, or None when it is not sharded (``model.tp_size`` unset or 1).

    Read from transformers' own sharding: the mesh of the first layer's ``k_proj`` weight (a ``DTensor``)."""
    size = getattr(model, "tp_size", None)
    if not size or int(size) <= 1:
        return None
    from torch.distributed.tensor import DTensor, Shard

    from .models import decoder_layers

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    weight = decoder_layers(model)[0].self_attn.k_proj.weight
    if not isinstance(weight, DTensor) or not any(isinstance(p, Shard) and p.dim == 0 for p in weight.placements):
        raise ValueError(
            f"the model has tp_size={size} but its k_proj weight is not sharded by output rows (placements "
            f"{getattr(weight, 'placements', None)}): squeezekv supports transformers' default tensor-parallel plan "
            "(k_proj/v_proj 'colwise'), where each rank holds whole KV heads"
        )
    mesh = weight.device_mesh
    size = mesh.size()
    if kv_heads % size:
        raise ValueError(
            f"num_key_value_heads={kv_heads} is not divisible by tp_size={size}: each rank must hold whole KV heads; "
            f"choose a tp_size that divides {kv_heads}"
        )
    return TensorParallel(group=mesh.get_group(), rank=mesh.get_local_rank(), size=size, kv_heads=kv_heads)


def check_methods(cache: "SqueezeCache", tp: TensorParallel) -> None:
    """Refuse, before anything runs, what cannot work on a sharded model (named in the message)."""
    channel = cache.channel
    if channel is not None and channel.name == "coupled":
        from pathlib import Path

        calibrated = channel.calibration and Path(channel.calibration).is_file()
        if getattr(channel, "_books", None) is None and not calibrated:
            raise ValueError(
                f"coupled under tensor parallelism (tp_size={tp.size}) needs codebooks calibrated on the unsharded "
                "model: make them with `squeezekv calibrate-cq --out FILE` (one process, no tp_plan) and pass "
                "channel_params={'calibration': FILE}"
            )


def bind(cache: "SqueezeCache", tp: TensorParallel) -> None:
    """Make ``cache`` this rank's share of a sharded model's cache: per-head tables cut to the rank's KV heads, and
    the group kept on ``cache.tp`` for the decisions that must agree (layer importances)."""
    if cache.channel is not None:
        cache.channel.shard_heads(tp.head_start, tp.head_stop, tp.kv_heads)
    cache.tp = tp


def _tp_of(cache: Any) -> TensorParallel | None:
    return getattr(cache, "tp", None)


def nbytes_per_rank(cache: "SqueezeCache", kv_only: bool = False) -> list[int]:
    """Every rank's ``cache.nbytes()`` (``kv_nbytes()`` with ``kv_only``), in rank order (one ``all_gather``; the
    local value alone when the model is not sharded). Call it on every rank."""
    local = cache.kv_nbytes() if kv_only else cache.nbytes()
    tp = _tp_of(cache)
    if tp is None:
        return [local]
    mine = torch.tensor([local], dtype=torch.int64)
    out = [torch.zeros_like(mine) for _ in range(tp.size)]
    dist.all_gather(out, mine, group=tp.group)
    return [int(t) for t in out]


def total_nbytes(cache: "SqueezeCache") -> int:
    """Bytes of the whole cache over every rank of the tensor-parallel group (``cache.nbytes()`` summed)."""
    return sum(nbytes_per_rank(cache))


def total_kv_nbytes(cache: "SqueezeCache") -> int:
    """Key and value bytes over every rank (``cache.kv_nbytes()`` summed)."""
    return sum(nbytes_per_rank(cache, kv_only=True))


def check_agreement(cache: "SqueezeCache") -> None:
    """Raise ``RuntimeError`` unless every rank's cache agrees on what must be the same everywhere: tokens seen
    (``get_seq_length()`` of every layer, the model's positions come from it) and the budget plan. A no-op when the
    model is not sharded. Call it on every rank (two ``all_gather`` of a few integers)."""
    tp = _tp_of(cache)
    if tp is None:
        return
    seen = [int(cache.get_seq_length(i)) for i in range(len(cache.layers))]
    plan = [] if cache.plan is None else [-1 if b is None else int(b) for b in cache.plan.budgets]
    for what, values in (("tokens seen per layer", seen), ("budget plan", plan)):
        agreed, diff = tp.agree(what, values)
        if diff != 0.0:
            raise RuntimeError(
                f"rank {tp.rank} of the tensor-parallel group disagrees with rank 0 on the {what}: {values} here, "
                f"{[int(v) for v in agreed]} on rank 0"
            )


__all__ = [
    "TensorParallel", "tensor_parallel", "check_methods", "bind", "nbytes_per_rank", "total_nbytes",
    "total_kv_nbytes", "check_agreement",
]
