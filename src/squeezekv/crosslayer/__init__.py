"""Cross-layer KV sharing: architectures whose layers read keys/values computed by other layers, and training-free
methods that let a layer reuse another layer's attention (importing this package registers them).

* :mod:`squeezekv.crosslayer.lckv` — Layer-Condensed KV cache (Wu & Tu, ACL 2024, arXiv 2405.10637).
* :mod:`squeezekv.crosslayer.shared_attention` — Shared Attention (Liao & Vargas 2024, arXiv 2407.12866); spans are
  proposed by :mod:`squeezekv.crosslayer.analyze` (``squeezekv analyze-layers``).
"""

from . import shared_attention  # noqa: F401  (registers the method)
