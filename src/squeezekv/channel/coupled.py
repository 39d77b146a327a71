"""Coupled Quantization (CQ): contiguous channels quantised jointly with learned centroids, down to 1 bit per channel.

Paper: Zhang, Yi, Xu, Shrivastava, "KV Cache is 1 Bit Per Channel: Efficient Large Language Model Inference with
Coupled Quantization", NeurIPS 2024, arXiv 2405.03917. Channels of a key/value vector are inter-dependent (their
joint entropy grows slower than the sum of their marginal entropies), so ``c`` contiguous channels are *coupled* and
share one code of ``bits * c`` bits that indexes a codebook of ``2 ** (bits * c)`` centroids in ``c`` dimensions. The
codebooks are learned per layer, per KV head, per channel group, separately for keys and values, by k-means on
calibration activations. The paper's "CQ-<c>c<w>b" configurations: ``8c8b`` = 1 bit per channel, ``4c8b`` = 2 bits.

Parameters: ``bits`` per channel (1 or 2), ``channels`` coupled per group (0 = ``8 // bits``: one 8-bit code per
group, the paper's 8c8b / 4c8b), ``residual`` newest tokens kept in full precision (0 = none; the prompt still attends
to itself in full precision before it is quantised), ``calibration``: the codebook file (required by
:func:`squeezekv.make_cache`; made by ``squeezekv calibrate-cq --out FILE``, or :func:`calibrate` then
:func:`save_codebooks`), ``kernel``: how a decoding step attends over the quantised tokens (``"auto"``: the fused
Triton kernel of :mod:`squeezekv.channel.coupled_triton` on CUDA, else the PyTorch reference path, so CPU behaviour
never changes; ``"torch"``: always the reference path; ``"triton"``: the kernel, ValueError where it cannot run; same
semantics as KIVI's ``kernel``), ``kernel_config``: the kernel's launch settings
(:class:`squeezekv.channel.kernels.CoupledKernelConfig` or a dict of its fields; None: the defaults).

Calibration (:func:`calibrate`): the model runs over calibration text with transformers' own cache and the cached
keys (after rotary embedding, as squeezekv stores them) and values of every layer are clustered with k-means
(:func:`kmeans`, k-means++ seeding, Lloyd iterations; plain squared error: the paper's Fisher-information weighting
of the k-means objective is not implemented). Default calibration text (:func:`calibration_ids`): short pages of the
Linux kernel documentation, which the evaluation never uses (it reads pages of at least 20,000 characters and the
essays). Calibration is explicit, never part of building a cache: ``prepare(model)`` (called by
:func:`squeezekv.make_cache`) only loads the ``calibration`` file and raises ``ValueError`` without one;
``squeezekv calibrate-cq --out FILE`` calibrates a model from the command line.

Storage: codes packed into bytes, ``D * bits / 8`` bytes per token per head for keys and again for values; the
codebooks (``2 * H * (D / c) * 2**(bits*c) * c`` floats per layer) are shared by every sequence and every cache of
the method and are not counted in a cache's bytes (:meth:`CoupledQuant.codebook_nbytes` reports them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from ..eval.data import EVAL_MIN_CHARS
from ..registry import register_channel
from .base import ChannelMethod
from .kernels import CoupledKernelConfig, FusedKernelChoice, check_kernel, kernel_config
from .packing import check_width, pack, unpack
from .quantized import QuantizedLayer

#: largest groups x points x centroids seeded with k-means++ (larger problems: random distinct points)
KMEANS_PP_LIMIT = 1 << 22
#: points per chunk of the nearest-centroid search when tokens are quantised (memory: groups x chunk x centroids floats)
NEAREST_CHUNK = 1024
#: values of :attr:`CoupledQuant.kernel`
#: calibration pages are shorter than this (the evaluation's linux-doc pages are at least this long)
CALIB_MAX_CHARS = EVAL_MIN_CHARS
#: how to make the file ``channel_params={"calibration": FILE}`` names (quoted by the errors)
CALIBRATE_HINT = ("make it with `squeezekv calibrate-cq --out FILE`, or squeezekv.channel.coupled.calibrate(...) "
                  "then save_codebooks(..., FILE)")


# -- k-means --------------------------------------------------------------------------------------------------------
def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean): ``x`` ``[G, N, c]``, ``centroids`` ``[G, k, c]`` ->
    ``[G, N]`` int64."""
    out = []
    c2 = (centroids * centroids).sum(-1)[:, None, :]  # [G, 1, k]
    ct = centroids.transpose(1, 2)  # [G, c, k]
    for s in range(0, x.shape[1], chunk):
        # |x - c|^2 - |x|^2 = |c|^2 - 2 x.c  (|x|^2 is the same for every centroid)
        out.append(torch.baddbmm(c2, x[:, s:s + chunk], ct, alpha=-2.0).argmin(-1))  # [G, chunk]
    return torch.cat(out, dim=1)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """k-means of ``G`` independent point sets at once: ``x`` ``[G, N, c]`` -> centroids ``[G, k, c]`` (float32).

    Seeding: k-means++ (each new seed drawn with probability proportional to the squared distance to the nearest seed
    so far) when ``G * N * k <= KMEANS_PP_LIMIT``, else ``k`` distinct random points per group (k-means++ costs ``k``
    sequential passes over the data). Then Lloyd iterations until the assignment stops changing or ``iters`` is
    reached. A centroid that loses all its points keeps its position."""
    if x.dim() != 3:
        raise ValueError(f"kmeans expects points [groups, n, dims], got shape {tuple(x.shape)}")
    g, n, c = x.shape
    if not isinstance(k, int) or k < 1 or k > n:
        raise ValueError(f"kmeans k={k!r} is out of range: need 1 <= k <= number of points ({n})")
    x = x.float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = torch.arange(g, device=x.device)
    first = torch.randint(0, n, (g,), generator=gen).to(x.device)
    if g * n * k > KMEANS_PP_LIMIT:
        pick = torch.rand((g, n), generator=gen).argsort(dim=-1)[:, :k].to(x.device)  # [G, k] distinct
        return _lloyd(x, x.gather(1, pick[..., None].expand(-1, -1, c)), iters)
    cent = x.new_empty((g, k, c))
    cent[:, 0] = x[rows, first]
    best = ((x - cent[:, :1]) ** 2).sum(-1)  # [G, N] squared distance to the nearest seed
    for j in range(1, k):
        # draw one point per group with probability best / sum(best) (inverse CDF; all on the seeds: uniform)
        w = best.double()
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
        cdf = w.cumsum(-1)  # [G, N]
        u = torch.rand((g, 1), generator=gen, dtype=torch.float64).to(x.device) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u).clamp_(max=n - 1).squeeze(1)
        cent[:, j] = x[rows, pick]
        best = torch.minimum(best, ((x - cent[:, j:j + 1]) ** 2).sum(-1))
    return _lloyd(x, cent, iters)


def _lloyd(x: torch.Tensor, cent: torch.Tensor, iters: int) -> torch.Tensor:
    g, n, c = x.shape
    k = cent.shape[1]
    assign = None
    for _ in range(iters):
        new_assign = nearest(x, cent)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(cent).scatter_add_(1, assign[..., None].expand(-1, -1, c), x)
        counts = torch.zeros((g, k), device=x.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=x.dtype))
        cent = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], cent)
    return cent


# -- calibration ----------------------------------------------------------------------------------------------------
def calibration_texts(max_chars: int = CALIB_MAX_CHARS, root: Path | None = None) -> list[tuple[str, str]]:
    """``[(page, text)]`` of the English Linux kernel documentation pages of 2,000 to ``max_chars`` characters
    (disjoint from the evaluation's pages, which are at least 20,000 characters), sorted by path (``root`` defaults
    to ``$SQUEEZEKV_LINUX_DOC``, else the Debian package's folder, as for the evaluation's pages)."""
    from ..eval.data import load_linux_docs

    return load_linux_docs(root, 2000, max_chars, missing_hint="or give coupled a calibration file instead")


def calibration_ids(tokenizer: Any, tokens: int, seq_len: int = 1024) -> torch.Tensor:
    """Token ids ``[tokens // seq_len, seq_len]`` of calibration text (pages concatenated in path order)."""
    ids: list[int] = []
    rows = max(1, tokens // seq_len)
    for _, text in calibration_texts():
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= rows * seq_len:
            break
    if len(ids) < rows * seq_len:
        raise ValueError(f"only {len(ids)} calibration tokens available, {rows * seq_len} requested")
    return torch.tensor(ids[: rows * seq_len]).reshape(rows, seq_len)


@torch.no_grad()
def collect_kv(model: Any, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Cached keys (after rotary embedding) and values of every layer over ``input_ids`` ``[N, L]`` (one row at a
    time, transformers' own cache): ``{layer: (keys [H, N * L, D], values [H, N * L, Dv])}`` in float32."""
    from transformers import DynamicCache

    from ..generation import cache_kwargs

    device = next(model.parameters()).device
    out: dict[int, list[list[torch.Tensor]]] = {}
    for row in input_ids:
        cache = DynamicCache(config=model.config)
        model(input_ids=row[None].to(device), use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        for i, layer in enumerate(cache.layers):
            k, v = layer.keys[0].float(), layer.values[0].float()  # [H, L, D]
            out.setdefault(i, [[], []])
            out[i][0].append(k)
            out[i][1].append(v)
    return {i: (torch.cat(kv[0], dim=1), torch.cat(kv[1], dim=1)) for i, kv in out.items()}


def learn_codebooks(kv: dict[int, tuple[torch.Tensor, torch.Tensor]], bits: int, channels: int, iters: int = 25,
                    seed: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Codebooks ``{layer: (keys [H, D / c, 2**(bits*c), c], values [H, Dv / c, ..., c])}`` by k-means over each
    (head, channel group) of the calibration keys/values ``[H, N, D]``."""
    k = 1 << (bits * channels)
    out = {}
    for i, (keys, values) in sorted(kv.items()):
        books = []
        for t in (keys, values):
            h, n, d = t.shape
            if d % channels:
                raise ValueError(f"coupled channels={channels} does not divide the head dimension {d} of layer {i}")
            pts = t.reshape(h, n, d // channels, channels).permute(0, 2, 1, 3).reshape(h * d // channels, n, channels)
            books.append(kmeans(pts, k, iters, seed + i).reshape(h, d // channels, k, channels).cpu())
        out[i] = (books[0], books[1])
    return out


def calibrate(model: Any, input_ids: torch.Tensor, bits: int, channels: int, iters: int = 25,
              seed: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Codebooks of every layer of ``model`` from its keys/values over ``input_ids`` ``[N, L]``
    (:func:`calibration_ids` gives the default calibration text); :func:`save_codebooks` writes them to the file
    that ``channel_params={"calibration": FILE}`` loads."""
    from ..models import arch_spec

    for name, v in (("iters", iters), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"coupled calibration {name}={v!r} is out of range: must be an integer >= 0")
    arch_spec(model.config)  # an unsupported model: the architecture error, before any calibration work
    return learn_codebooks(collect_kv(model, input_ids), bits, channels, iters, seed)


def save_codebooks(books: dict[int, tuple[torch.Tensor, torch.Tensor]], path: str | Path, bits: int,
                   channels: int = 0) -> None:
    """Write the codebooks of :func:`calibrate` (made with ``bits`` per channel, ``channels`` coupled; 0 = ``8 //
    bits``) to ``path``, the file ``channel_params={"calibration": path}`` loads. Shapes are checked first."""
    method = CoupledQuant(bits=bits, channels=channels)
    method.set_codebooks(books)
    method.save(path)


# -- the layer ------------------------------------------------------------------------------------------------------
class CoupledLayer(FusedKernelChoice, QuantizedLayer):
    """Storage: ``kcode``/``vcode`` ``[B, H, nq, (D / c) * bits * c / 8]`` uint8 (one code of ``bits * c`` bits per
    channel group, packed), codebooks ``[H, D / c, 2**(bits*c), c]`` shared with the method. A layer that stores values
    only (:attr:`SqueezeLayer.stores_keys` False) has ``vcode`` and no key codes."""

    token_fields = ("kcode", "vcode")

    def __init__(self, cache: Any, layer_idx: int, method: "CoupledQuant"):
        super().__init__(cache, layer_idx, residual=method.residual, flush_block=1)
        self.method = method
        self.c = method.coupled
        self.width = method.bits * method.coupled  # bits per code
        self.kernel = method.kernel
        self.kernel_config: CoupledKernelConfig = kernel_config(CoupledKernelConfig, method.kernel_config, "coupled")
        self._cast_books: tuple[torch.Tensor, torch.Tensor] | None = None  # codebooks in the query's dtype

    def _init_storage(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        kb, vb = self.method.codebooks_for(self.layer_idx, key_states.device)
        for book, t, what in ((kb, key_states, "key"), (vb, value_states, "value"))[0 if self.stores_keys else 1:]:
            if book.shape[0] != h or book.shape[1] * book.shape[3] != t.shape[-1]:
                raise ValueError(
                    f"coupled codebooks of layer {self.layer_idx} ({what}s: {book.shape[0]} heads x "
                    f"{book.shape[1] * book.shape[3]} channels) do not match the model ({h} heads x {t.shape[-1]})"
                )
        self.kbook, self.vbook = (kb if self.stores_keys else None), vb
        self._cast_books = None
        if self.stores_keys:  # a values-only layer has no key codes
            self.kcode = torch.empty((b, h, 0, d // self.c * self.width // 8), dtype=torch.uint8, device=self.device)
        self.vcode = torch.empty((b, h, 0, value_states.shape[-1] // self.c * self.width // 8), dtype=torch.uint8,
                                 device=self.device)

    def _codes(self, x: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        # x: [B, H, m, D], book: [H, D/c, K, c] -> packed codes [B, H, m, (D/c) * width / 8]
        b, h, m, d = x.shape
        ng = d // self.c
        xg = x.float().reshape(b, h, m, ng, self.c).permute(1, 3, 0, 2, 4).reshape(h * ng, b * m, self.c)
        idx = nearest(xg, book.reshape(h * ng, -1, self.c), NEAREST_CHUNK)  # [H * ng, B * m]
        idx = idx.reshape(h, ng, b, m).permute(2, 0, 3, 1)  # [B, H, m, ng]
        return pack(idx, self.width)

    def _encode(self, keys: torch.Tensor | None, values: torch.Tensor, reserve: int) -> None:
        if keys is not None:
            self._append("kcode", self._codes(keys, self.kbook), reserve)
        self._append("vcode", self._codes(values, self.vbook), reserve)

    def _decode(self, codes: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        # codes: [B, H, m, P] -> [B, H, m, D]
        idx = unpack(codes, self.width).long()  # [B, H, m, ng]
        b, h, m, ng = idx.shape
        heads = torch.arange(h, device=idx.device).view(1, h, 1, 1)
        groups = torch.arange(ng, device=idx.device).view(1, 1, 1, ng)
        return book[heads, groups, idx].reshape(b, h, m, ng * self.c).to(self.dtype)  # [B, H, m, ng, c] -> D

    def _dequant(self, pos: slice | torch.Tensor, keys: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        def rows(t: torch.Tensor) -> torch.Tensor:
            if isinstance(pos, slice):
                return t[:, :, pos]
            return t.gather(2, pos[..., None].expand(-1, -1, -1, t.shape[-1]))

        k = self._decode(rows(self.kcode), self.kbook) if keys and self.stores_keys else None
        return k, self._decode(rows(self.vcode), self.vbook)

    method_name = "coupled"
    kernel_module_name = "coupled_triton"

    def _kernel_support(self, kt: Any, device: torch.device, dtype: torch.dtype, d: int) -> str | None:
        if not self.stores_keys:
            return "the layer stores values only"
        return kt.supports(device, d, self.values.shape[-1], self.width, self.c, dtype)

    def _quantised_state(self, qg: torch.Tensor, mask: torch.Tensor | None, scaling: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # the fused kernel for decoding steps (kernel "auto" only on CUDA: CPU behaviour never changes)
        if not self._use_kernel(qg, mask is None and qg.shape[3] == 1):
            return super()._quantised_state(qg, mask, scaling)
        if self._cast_books is None or self._cast_books[0].dtype != qg.dtype:  # cast once, not per step
            self._cast_books = (self.kbook.to(qg.dtype), self.vbook.to(qg.dtype))
        n = self.nq
        state = self._run_kernel(lambda ct: ct.decode_state(qg[:, :, :, 0], self.kcode[:, :, :n], self.vcode[:, :, :n],
                                                            *self._cast_books, scaling,
                                                            config=self.kernel_config))
        if state is None:
            return super()._quantised_state(qg, mask, scaling)
        m, s, acc = state  # [B, H, G], [B, H, G], [B, H, G, Dv]
        return m[..., None], s[..., None], acc[:, :, :, None]

    def _gather_quantised(self, idx: torch.Tensor) -> None:
        for name in ("kcode", "vcode")[0 if self.stores_keys else 1:]:
            t = getattr(self, name)
            setattr(self, name, t.gather(2, idx[..., None].expand(-1, -1, -1, t.shape[-1])))


@register_channel("coupled")
@dataclass
class CoupledQuant(ChannelMethod):
    """Coupled Quantization: ``channels`` contiguous channels share a k-means code of ``bits * channels`` bits."""

    paper = "Zhang et al. 2024, arXiv 2405.03917"
    layer_class = CoupledLayer
    summary = "coupled channels share a learned k-means code: 1-2 bits per channel (calibrated)"
    bits: int = 1
    channels: int = 0
    residual: int = 0
    calibration: str | None = None
    kernel: str = "auto"
    kernel_config: CoupledKernelConfig | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        self.kernel_config = asdict(kernel_config(CoupledKernelConfig, self.kernel_config, "coupled"))  # plain data
        if isinstance(self.bits, bool) or self.bits not in (1, 2):
            raise ValueError(f"coupled bits={self.bits!r} is out of range: choose 1 or 2 bits per channel")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 0:
            raise ValueError(f"coupled channels={self.channels!r} is out of range: an integer >= 1 (0 = 8 // bits)")
        check_width(self.bits * self.coupled, f"coupled bits * channels = {self.bits} * {self.coupled}")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"coupled residual={self.residual!r} is out of range: must be an integer >= 0")
        if self.calibration is not None and not isinstance(self.calibration, (str, Path)):
            raise TypeError(f"coupled calibration={self.calibration!r} must be a file path (str), got "
                            f"{type(self.calibration).__name__}")
        check_kernel("coupled", self.kernel, "coupled_triton")
        self._books: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._on_device: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def coupled(self) -> int:
        """Channels coupled per group (``channels``, or ``8 // bits`` when 0)."""
        return self.channels or 8 // self.bits

    def make_layer(self, cache: Any, layer_idx: int, role: type | None = None, **role_kwargs: Any) -> CoupledLayer:
        check_kernel("coupled", self.kernel, "coupled_triton", at_creation=True)
        return super().make_layer(cache, layer_idx, role, **role_kwargs)

    def describe(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
        return f"{self.name}({params})"

    # -- codebooks ----------------------------------------------------------------------------------------------
    def set_codebooks(self, books: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        k = 1 << (self.bits * self.coupled)
        for i, (kb, vb) in books.items():
            for b in (kb, vb):
                if b.dim() != 4 or b.shape[2] != k or b.shape[3] != self.coupled:
                    raise ValueError(
                        f"codebook of layer {i} has shape {tuple(b.shape)}; bits={self.bits}, channels={self.coupled} "
                        f"need [heads, groups, {k}, {self.coupled}]"
                    )
        self._books = {int(i): (kb.float(), vb.float()) for i, (kb, vb) in books.items()}
        self._on_device = {}

    def codebooks_for(self, layer_idx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._books is None:
            raise ValueError("coupled has no codebooks: build the cache with squeezekv.make_cache and "
                             f"channel_params={{'calibration': FILE}} ({CALIBRATE_HINT})")
        if layer_idx not in self._books:
            raise ValueError(f"coupled codebooks cover layers {sorted(self._books)}, not layer {layer_idx}")
        key = (layer_idx, str(device))
        if key not in self._on_device:
            kb, vb = self._books[layer_idx]
            self._on_device[key] = (kb.to(device), vb.to(device))
        return self._on_device[key]

    def codebook_nbytes(self) -> int:
        """Bytes of all codebooks (float32), shared by every cache of this method."""
        return 0 if self._books is None else sum(b.numel() * 4 for kv in self._books.values() for b in kv)

    def save(self, path: str | Path) -> None:
        if self._books is None:
            raise ValueError("no codebooks to save: calibrate first")
        torch.save({"method": "coupled", "bits": self.bits, "channels": self.coupled, "layers": self._books}, path)

    def load(self, path: str | Path) -> None:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("method") != "coupled" or data.get("bits") != self.bits or data.get("channels") != self.coupled:
            raise ValueError(
                f"{path} holds codebooks for bits={data.get('bits')}, channels={data.get('channels')}; this method "
                f"has bits={self.bits}, channels={self.coupled}"
            )
        self.set_codebooks(data["layers"])

    def prepare(self, model: Any) -> None:
        """Load the codebooks from the ``calibration`` file (unless set already with :meth:`set_codebooks`) and
        check they cover every layer of ``model``. Never calibrates: without the file, ``ValueError`` naming the
        parameter and the command that makes it."""
        if self._books is None:
            if not self.calibration:
                raise ValueError(f"coupled needs codebooks: give channel_params={{'calibration': FILE}} "
                                 f"({CALIBRATE_HINT})")
            if not Path(self.calibration).is_file():
                raise ValueError(f"coupled calibration={str(self.calibration)!r} is not a file: give "
                                 f"channel_params={{'calibration': FILE}} ({CALIBRATE_HINT})")
            self.load(self.calibration)
        layers = model.config.get_text_config().num_hidden_layers
        missing = [i for i in range(layers) if i not in self._books]
        if missing:
            raise ValueError(f"coupled codebooks miss layers {missing} of the model")

    def shard_heads(self, start: int, stop: int, total: int) -> None:
        """Keep the codebooks of KV heads ``start:stop`` (they were learned on the unsharded model's ``total``)."""
        if self._books is None:
            raise ValueError("coupled has no codebooks to shard: prepare it with the model first")
        for i, (kb, vb) in self._books.items():
            if kb.shape[0] != total or vb.shape[0] != total:
                raise ValueError(
                    f"coupled codebooks of layer {i} cover {kb.shape[0]} KV heads, not the model's {total}: under "
                    "tensor parallelism give a calibration file made on the unsharded model"
                )
        self._books = {i: (kb[start:stop].contiguous(), vb[start:stop].contiguous())
                       for i, (kb, vb) in self._books.items()}
        self._on_device = {}

    def calibrate(self, model: Any, input_ids: torch.Tensor, iters: int = 25, seed: int = 0) -> None:
        """Learn this method's codebooks on ``model`` over ``input_ids`` ``[N, L]`` (:func:`calibrate`)."""
        self.set_codebooks(calibrate(model, input_ids, self.bits, self.coupled, iters, seed))

    def bytes_per_token(self, head_dim: int, kv_heads: int) -> float:
        """KV bytes of one quantised token in one layer (all KV heads), codebooks not included."""
        return kv_heads * 2 * head_dim * self.bits / 8

