"""Eigen Attention: every cached key and value is stored in a low-rank basis found by PCA on calibration text.

Paper: Saxena, Saha, Choudhary, Roy, "Eigen Attention: Attention in Low-Rank Space for KV Cache Compression",
Findings of EMNLP 2024, arXiv 2408.05646 (official code: github.com/UtkarshSaxena1/EigenAttn, read for the details
below, none of it copied).

**Bases.** A calibration run (:mod:`squeezekv.channel.eigen_calibrate`, ``squeezekv calibrate-eigen``) accumulates,
per layer and KV head, the uncentred Gram matrix ``XᵀX`` of the keys and of the values over real text; its
eigenvectors ``U`` ``[D, D]``, sorted by eigenvalue ``λ`` (= squared singular value of ``X``), are the principal
directions. The file holds the full bases; the rank is chosen when the cache is built, so one file serves every
threshold.

**Rank.** Per layer, for keys and values separately: each KV head needs the smallest ``r`` whose explained energy
``Σ_{i<r} λ_i / Σ λ_i`` reaches ``threshold`` (the squared Frobenius norm of the projected calibration matrix, so the
relative reconstruction error of the calibration keys is at most ``sqrt(1 - threshold)``); the layer stores
``r = max`` over its KV heads (one tensor per layer). ``threshold = 1`` keeps ``r = head_dim`` (a lossless rotation);
``rank`` fixes ``r`` for every layer instead. The paper picks each layer's threshold by lowering it from 1 in steps of
0.02 until the layer's output error on calibration data exceeds a budget (then stepping back 0.04); its code
normalises singular values ``σ_i / Σσ`` rather than ``σ²``. squeezekv exposes the energy threshold itself: the
layer-output search needs the model's layers in isolation, which squeezekv does not drive. (The paper's Llama code
shares one key basis across a layer's KV heads; squeezekv fits one per KV head.)

**RoPE (how the paper treats it, ``rope="pre"``, the default).** A low-rank projection does not commute with RoPE's
position-dependent rotation, so for Llama-type models the paper's code computes the key basis on keys *before* RoPE,
caches the low-rank pre-RoPE keys, and at attention time projects them back to ``head_dim`` and applies RoPE before
an ordinary attention with full-dimension queries. transformers applies RoPE before ``cache.update``, so the layer
undoes it: RoPE at position ``p`` is ``x·cos + rotate_half(x)·sin`` with ``cos² + sin²`` constant per channel pair,
inverted exactly by ``(y·cos - rotate_half(y)·sin) / (cos² + sin²)`` with ``cos``/``sin`` from the model's own rotary
module at the token's position (from the model's ``position_ids``). The layer stores ``k_pre U_K[:, :r_K]``
``[B, H, n, r_K]``; each attention call rebuilds the rotated keys of the held tokens (``[B, H, n, D]``, transient,
freed after the call) at positions ``token index + row offset`` (the offset is what left padding shifts).
``rope="post"`` is the paper's treatment of models *without* RoPE applied to the rotated keys the attention function
sees: the key basis comes from post-RoPE keys and queries together, the cache stores ``k U_K``, the queries are
projected with the same ``U_K`` and the logits are computed in ``r_K`` dimensions (``q·k ≈ (qU)(kU)ᵀ``) — cheaper
attention, but RoPE spreads each head's energy over more directions, so the same threshold needs a larger rank.

**Values** (both modes): the cache stores ``v U_V[:, :r_V]`` per KV head; the attention weights multiply the
low-rank values and the output is mapped back with ``U_Vᵀ`` in :meth:`EigenLayer.attend` (the paper folds ``U_V``
into ``o_proj``; squeezekv does not edit model weights).

**Composition.** Tokens are projected when they enter the cache (the paper folds the projections into the weights,
so even the prompt attends in the low-rank space). Eviction policies score with the attention the model really
computes: H2O receives its weights, SnapKV's window queries score against the same keys (rebuilt rotated keys for
``pre``, projected queries and low-rank keys for ``post``). Eviction gathers the low-rank rows, so the survivors stay
low-rank and every allocation works unchanged. Bytes per held token and KV head: ``(r_K + r_V)`` elements plus the
usual bookkeeping (token index, score); the bases (``float32``, per model) are reported by :meth:`EigenAttention.
basis_nbytes`. Not supported: the CUDA-graph decoder, cross-layer methods that give a layer another role (Shared
Attention's source/shared layers: ``ValueError``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..cache import SqueezeLayer
from ..registry import register_channel
from .base import ChannelMethod

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import SqueezeCache

#: format tag of calibration files
FORMAT = "squeezekv-eigen/1"
#: the three bases a calibration file holds: pre-RoPE keys, post-RoPE keys + queries, values
BASES = ("key_pre", "key_post", "value")


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(config: Any) -> dict[str, Any]:
    """What a calibration must match: layer count, KV heads, head dim (and the model type, for messages)."""
    cfg = text_config(config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "model_type": getattr(cfg, "model_type", None),
        "num_layers": int(cfg.num_hidden_layers),
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        "head_dim": int(head_dim),
    }


def select_rank(eigenvalues: torch.Tensor, threshold: float) -> torch.Tensor:
    """Smallest ``r`` in ``1..D`` per row of ``eigenvalues`` ``[..., D]`` (descending) whose explained energy
    ``sum(λ[:r]) / sum(λ)`` is at least ``threshold``; ``threshold >= 1`` gives ``D``."""
    d = eigenvalues.shape[-1]
    if threshold >= 1.0:
        return torch.full(eigenvalues.shape[:-1], d, dtype=torch.long)
    lam = eigenvalues.double().clamp_min(0.0)
    frac = lam.cumsum(-1) / lam.sum(-1, keepdim=True).clamp_min(1e-300)  # [..., D]
    return ((frac < threshold - 1e-12).sum(-1) + 1).clamp(max=d)


# -- RoPE ----------------------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it (``rotate_half`` layout; the first ``cos.shape[-1]`` channels rotate)."""
    rot = cos.shape[-1]
    xr = x[..., :rot]
    out = xr * cos + _rotate_half(xr) * sin
    return out if rot == x.shape[-1] else torch.cat((out, x[..., rot:]), dim=-1)


def unapply_rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (exact up to rounding, also with an ``attention_scaling`` factor in cos/sin)."""
    rot = cos.shape[-1]
    yr = y[..., :rot]
    out = (yr * cos - _rotate_half(yr) * sin) / (cos * cos + sin * sin)
    return out if rot == y.shape[-1] else torch.cat((out, y[..., rot:]), dim=-1)


class RotaryTable:
    """``cos``/``sin`` at any positions from the model's own rotary module (``model.model.rotary_emb``), so every
    RoPE variant transformers implements (scaling, partial rotary, Gemma's per-layer-type tables) is matched."""

    def __init__(self, model: Any):
        inner = getattr(model, "model", model)
        module = getattr(inner, "rotary_emb", None)
        if module is None:
            raise ValueError(
                f"{type(model).__name__} has no rotary embedding at model.model.rotary_emb: eigen rope='pre' needs "
                "it (use rope='post')"
            )
        self.module = module
        self.layer_types = list(getattr(text_config(model.config), "layer_types", None) or [])
        self.takes_layer_type = "layer_type" in inspect.signature(module.forward).parameters

    def cos_sin(self, positions: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` ``[M, n]`` (int) -> ``(cos, sin)`` ``[M, n, rot]`` float32."""
        x = torch.empty(0, dtype=torch.float32, device=positions.device)
        kwargs = {}
        if self.takes_layer_type:
            kwargs["layer_type"] = self.layer_types[layer_idx] if self.layer_types else "full_attention"
        cos, sin = self.module(x, positions.long(), **kwargs)
        return cos.float(), sin.float()


# -- calibration file ----------------------------------------------------------------------------------------------


def load_calibration(path: str | Path, model: Any | None = None) -> dict[str, Any]:
    """Read and check a calibration file; with ``model``, check that it was made for that model's shape.
    Every problem is a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"eigen calibration file {str(path)!r} does not exist: make one with "
                         "`squeezekv calibrate-eigen --out FILE`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's error
        raise ValueError(f"{str(path)!r} is not a readable eigen calibration file "
                         f"({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an eigen calibration file (format tag {FORMAT!r} missing)")
    meta = state.get("model")
    if not isinstance(meta, dict) or not all(k in meta for k in ("num_layers", "num_kv_heads", "head_dim")):
        raise ValueError(f"{str(path)!r}: calibration file without the model's shape")
    shape = (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"])
    for name in BASES:
        entry = state.get(name)
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), torch.Tensor)
                                                  for k in ("basis", "eigenvalues")):
            raise ValueError(f"{str(path)!r}: calibration file without the {name!r} basis")
        basis, lam = entry["basis"], entry["eigenvalues"]
        if tuple(basis.shape) != (*shape, shape[-1]) or tuple(lam.shape) != shape:
            raise ValueError(
                f"{str(path)!r}: {name!r} basis has shape {tuple(basis.shape)} / eigenvalues {tuple(lam.shape)}, "
                f"expected {(*shape, shape[-1])} / {shape} (layers, KV heads, head dim)"
            )
        u = basis.double()
        eye = torch.eye(shape[-1], dtype=torch.float64)
        err = float((u.transpose(-1, -2) @ u - eye).abs().max())
        if not math.isfinite(err) or err > 1e-3:
            raise ValueError(f"{str(path)!r}: {name!r} basis is not orthonormal (max |UᵀU - I| = {err:.2g})")
    if model is not None:
        want = model_shape(model.config)
        got = {k: meta[k] for k in ("num_layers", "num_kv_heads", "head_dim")}
        if got != {k: want[k] for k in got}:
            raise ValueError(
                f"{str(path)!r} was calibrated for a model with {got} but this model ({want['model_type']}) has "
                f"{ {k: want[k] for k in got} }: calibrate this model with `squeezekv calibrate-eigen`"
            )
    return state


# -- the layer -----------------------------------------------------------------------------------------------------


class EigenLayer(SqueezeLayer):
    """A managed layer whose keys/values are stored low-rank: ``keys`` ``[B, H, n, r_K]`` (pre- or post-RoPE
    coordinates, see the module docstring), ``values`` ``[B, H, n, r_V]``; ``pos_offset`` ``[B]`` int64 (rope="pre":
    position of a token = its index + the row's offset)."""

    supports_static = False  # the static path writes full-dimension keys/values into the slots
    supports_fill = False  # given keys/values would have to be projected into the calibrated basis

    def __init__(self, cache: "SqueezeCache", layer_idx: int):
        super().__init__(cache, layer_idx)
        self.pos_offset: torch.Tensor | None = None
        self._attn_keys: torch.Tensor | None = None  # rope="pre": rotated keys rebuilt for the current call

    @property
    def method(self) -> "EigenAttention":
        return self.cache.channel

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        method = self.method
        method.check_ready()
        if (h, d) != (method.num_kv_heads, method.head_dim):
            raise ValueError(f"layer {self.layer_idx} has {h} KV heads of dim {d}, the calibration "
                             f"{method.num_kv_heads} of dim {method.head_dim}")
        r_k, r_v = method.key_ranks[self.layer_idx], method.value_ranks[self.layer_idx]
        super().lazy_initialization(key_states.new_empty((b, h, 0, r_k)),
                                    value_states.new_empty((b, h, 0, r_v)))

    def _new_positions(self, model_kwargs: Any, b: int, q: int, device: torch.device) -> torch.Tensor:
        """Positions ``[B, q]`` of the new tokens (the model's ``position_ids``; its default otherwise); fixes or
        checks the row offset ``position - token index``."""
        pos = model_kwargs.get("position_ids") if isinstance(model_kwargs, dict) else None
        if pos is None:
            pos = torch.arange(self.seen, self.seen + q, device=device)[None]
        pos = pos.to(device).long()
        if pos.dim() != 2 or pos.shape[-1] != q:
            raise ValueError(f"eigen rope='pre' needs position_ids of shape [batch, {q}], got {tuple(pos.shape)}")
        pos = pos.expand(b, q)
        offset = pos[:, -1] - (self.seen + q - 1)  # [B]; the last new token is real (left padding)
        if self.pos_offset is None:
            self.pos_offset = offset.clone()
        elif q > 1 and not torch.equal(offset, self.pos_offset):
            raise ValueError("eigen rope='pre': position_ids are not the token index plus a constant per row")
        return pos

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states/value_states: [B, H, q, D], keys rotated to their positions by the model
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        u_k, u_v = self.method.bases(self.layer_idx, key_states.device)  # [H, D, r_K], [H, D, r_V] float32
        k = key_states.float()
        if self.method.rope == "pre":
            pos = self._new_positions(kwargs.get("kwargs"), b, q, key_states.device)
            cos, sin = self.method.rotary.cos_sin(pos, self.layer_idx)  # [B, q, rot]
            k = unapply_rope(k, cos[:, None], sin[:, None])  # [B, H, q, D] before RoPE
        k_low = torch.einsum("bhqd,hdr->bhqr", k, u_k).to(key_states.dtype)  # [B, H, q, r_K]
        v_low = torch.einsum("bhqd,hdr->bhqr", value_states.float(), u_v).to(value_states.dtype)  # [B, H, q, r_V]
        # (new tokens are projected in float32; the held ones below in the cache's dtype: a float32 copy of every
        # held key would cost more than the attention it feeds)
        keys, values = super().update(k_low, v_low, *args, **kwargs)
        if self.method.rope == "pre":
            self._attn_keys = self._rebuild_keys(keys, u_k)
            return self._attn_keys, values
        return keys, values

    def _rebuild_keys(self, keys: torch.Tensor, u_k: torch.Tensor) -> torch.Tensor:
        """Rotated full-dimension keys ``[B, H, n, D]`` of the held low-rank pre-RoPE keys ``[B, H, n, r_K]``
        (computed in the cache's dtype)."""
        k = torch.einsum("bhnr,hdr->bhnd", keys, u_k.to(keys.dtype))  # [B, H, n, D]
        tok = self.token_idx if self.compressed else self.token_idx[:, :1]  # heads agree until the first eviction
        pos = tok.long() + self.pos_offset[:, None, None]  # [B, H|1, n]
        bb, hh, n = pos.shape
        cos, sin = self.method.rotary.cos_sin(pos.reshape(bb, hh * n), self.layer_idx)
        cos, sin = cos.view(bb, hh, n, -1).to(keys.dtype), sin.view(bb, hh, n, -1).to(keys.dtype)
        return apply_rope(k, cos, sin)

    def attention_query(self, query: torch.Tensor) -> torch.Tensor:
        if self.method.rope == "pre":
            return query  # full-dimension queries against the rebuilt rotated keys
        b, hq, q, d = query.shape
        h = self.keys.shape[1]
        u_k, _ = self.method.bases(self.layer_idx, query.device)
        qg = query.float().reshape(b, h, hq // h, q, d)
        return torch.einsum("bhgqd,hdr->bhgqr", qg, u_k).reshape(b, hq, q, u_k.shape[-1]).to(query.dtype)

    def attention_keys(self) -> torch.Tensor:
        if self.method.rope == "pre":
            if self._attn_keys is None:
                self._attn_keys = self._rebuild_keys(self.keys, self.method.bases(self.layer_idx, self.device)[0])
            return self._attn_keys
        return self.keys

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None, scaling: float
    ) -> torch.Tensor:
        out = super().attend(query, key, value, allowed, scaling)  # [B, Hq, q, r_V]: weights x low-rank values
        b, hq, q, r_v = out.shape
        h = value.shape[1]
        _, u_v = self.method.bases(self.layer_idx, out.device)  # [H, D, r_V]
        full = torch.einsum("bhgqr,hdr->bhgqd", out.float().reshape(b, h, hq // h, q, r_v), u_v)
        return full.reshape(b, hq, q, u_v.shape[1]).to(query.dtype)  # [B, Hq, q, D]

    def after_attention(self, q_len: int) -> None:
        self._attn_keys = None  # the rebuilt keys live for one attention call only
        super().after_attention(q_len)

    def reset(self) -> None:
        super().reset()
        self.pos_offset = None
        self._attn_keys = None

    def _tensors(self) -> list[str]:
        return [*super()._tensors(), "pos_offset"]

    def nbytes(self) -> int:
        extra = 0 if self.pos_offset is None else self.pos_offset.untyped_storage().nbytes()
        return super().nbytes() + extra


# -- the method ----------------------------------------------------------------------------------------------------


@register_channel("eigen")
@dataclass
class EigenAttention(ChannelMethod):
    """Parameters: ``calibration`` (file from ``squeezekv calibrate-eigen``), ``threshold`` (explained energy per
    layer, in (0, 1]), ``rank`` (fixed rank for keys and values of every layer, overrides ``threshold``), ``rope``
    (``"pre"``: the paper's treatment of RoPE models; ``"post"``: attention in the low-rank space)."""

    paper = "Saxena et al. 2024, arXiv 2408.05646"
    summary = "keys/values stored in a low-rank PCA basis from calibration text (rank per layer by explained energy)"
    calibration: str = ""
    threshold: float = 0.9
    rank: int | None = None
    rope: str = "pre"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError(f"eigen threshold={self.threshold!r} is out of range: must be in (0, 1]")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"eigen rank={self.rank!r} is out of range: must be an integer >= 1 (or None)")
        if self.rope not in ("pre", "post"):
            raise ValueError(f"eigen rope={self.rope!r} is not supported: choose 'pre' (the paper's) or 'post'")
        self._ready = False

    # -- loading ------------------------------------------------------------------------------------------------
    def prepare(self, model: Any) -> None:
        if not self.calibration:
            raise ValueError("eigen needs calibration=PATH: make the file with `squeezekv calibrate-eigen --out PATH`")
        state = load_calibration(self.calibration, model)
        meta = state["model"]
        self.num_layers, self.num_kv_heads, self.head_dim = meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]
        if self.rank is not None and self.rank > self.head_dim:
            raise ValueError(f"eigen rank={self.rank} is out of range: must be <= head_dim ({self.head_dim})")
        key = state["key_pre" if self.rope == "pre" else "key_post"]
        value = state["value"]
        self.key_ranks = self._ranks(key["eigenvalues"])
        self.value_ranks = self._ranks(value["eigenvalues"])
        # [H, D, r] float32 per layer: the leading r eigenvectors
        self._key_bases = [key["basis"][i, :, :, :r].float().contiguous() for i, r in enumerate(self.key_ranks)]
        self._value_bases = [value["basis"][i, :, :, :r].float().contiguous() for i, r in enumerate(self.value_ranks)]
        self._on_device: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.rotary = RotaryTable(model) if self.rope == "pre" else None
        self.calibration_info = dict(state.get("calibration", {}))
        self._ready = True

    def shard_heads(self, start: int, stop: int, total: int) -> None:
        """Keep the bases of KV heads ``start:stop`` of the calibration's ``total``. The ranks stay those chosen over
        all heads, so every rank stores as many channels as the unsharded model."""
        self.check_ready()
        if total != self.num_kv_heads:
            raise ValueError(f"eigen calibration has {self.num_kv_heads} KV heads, the model {total}")
        self._key_bases = [u[start:stop].contiguous() for u in self._key_bases]  # [H_local, D, r_K]
        self._value_bases = [u[start:stop].contiguous() for u in self._value_bases]  # [H_local, D, r_V]
        self.num_kv_heads = stop - start
        self._on_device = {}

    def _ranks(self, eigenvalues: torch.Tensor) -> list[int]:
        """One rank per layer: the largest any of its KV heads needs (or the fixed ``rank``)."""
        if self.rank is not None:
            return [int(self.rank)] * eigenvalues.shape[0]
        return [int(r) for r in select_rank(eigenvalues, float(self.threshold)).amax(dim=-1)]

    def check_ready(self) -> None:
        if not getattr(self, "_ready", False):
            raise ValueError("eigen is not prepared: build the cache with squeezekv.make_cache(model, ..., "
                             "channel='eigen', channel_params={'calibration': PATH})")

    def bases(self, layer_idx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_K [H, D, r_K], U_V [H, D, r_V])`` float32 on ``device`` (copied once per device)."""
        key = (layer_idx, str(device))
        if key not in self._on_device:
            self._on_device[key] = (self._key_bases[layer_idx].to(device), self._value_bases[layer_idx].to(device))
        return self._on_device[key]

    # -- the channel-method protocol ----------------------------------------------------------------------------
    def make_layer(self, cache: "SqueezeCache", layer_idx: int, role: type | None = None,
                   **role_kwargs: Any) -> SqueezeLayer:
        if role is not None:
            raise ValueError(
                f"eigen does not compose with {cache.crosslayer.name}: its layer projects keys and values into the "
                "low-rank bases in update() and maps the output back with U_V in attend(), so a layer that attends "
                "with another layer's weights (or holds values only) would need its own low-rank value path; "
                "use kivi or coupled with a cross-layer method"
            )
        return EigenLayer(cache, layer_idx)

    def describe(self) -> str:
        return f"{self.name}(calibration={self.calibration}, threshold={self.threshold}, rank={self.rank}, " \
               f"rope={self.rope})"

    # -- reporting ----------------------------------------------------------------------------------------------
    def ranks(self) -> dict[str, list[int]]:
        self.check_ready()
        return {"key": list(self.key_ranks), "value": list(self.value_ranks)}

    def kv_elements_per_token(self, layers: list[int] | None = None) -> int:
        """Key + value elements one token occupies over ``layers`` (default all) and KV heads."""
        self.check_ready()
        layers = range(self.num_layers) if layers is None else layers
        return sum((self.key_ranks[i] + self.value_ranks[i]) * self.num_kv_heads for i in layers)

    def basis_nbytes(self) -> int:
        """Bytes of the bases kept for attention (float32, per model, not per token)."""
        self.check_ready()
        return sum(t.numel() * t.element_size() for t in (*self._key_bases, *self._value_bases))


__all__ = ["EigenAttention", "EigenLayer", "select_rank", "load_calibration", "apply_rope", "unapply_rope",
           "RotaryTable", "FORMAT"]
