"""Building a batch for a compressed cache: left padding with an attention mask, or a clear error."""

from __future__ import annotations

from typing import Sequence

import torch


def left_pad(
    sequences: Sequence[Sequence[int]], pad_token_id: int | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """``{"input_ids": [B, T], "attention_mask": [B, T]}`` with every sequence right-aligned (left padding), which
    squeezekv's caches need for batches of different lengths (padding is never kept ahead of real tokens).

    Sequences of different lengths without a ``pad_token_id`` raise ``ValueError`` naming the lengths."""
    if not sequences:
        raise ValueError("the batch is empty: give at least one sequence")
    lengths = [len(s) for s in sequences]
    if min(lengths) < 1:
        raise ValueError(f"sequence {lengths.index(0)} is empty: every sequence needs at least one token")
    longest = max(lengths)
    if len(set(lengths)) > 1 and pad_token_id is None:
        raise ValueError(
            f"the batch has sequences of lengths {lengths} and no pad_token_id: give one to left-pad them "
            "(tokenizer.pad_token_id), or batch sequences of equal length"
        )
    pad = 0 if pad_token_id is None else int(pad_token_id)
    ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, longest - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, longest - len(seq):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
