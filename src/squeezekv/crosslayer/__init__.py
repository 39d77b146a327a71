"""Cross-layer KV sharing: architectures whose layers read keys/values computed by other layers.

* :mod:`squeezekv.crosslayer.lckv` — Layer-Condensed KV cache (Wu & Tu, ACL 2024, arXiv 2405.10637).
* :mod:`squeezekv.crosslayer.minicache` — MiniCache, training-free merging of adjacent layers' KV (arXiv 2405.14366).
"""

from . import minicache  # noqa: F401  (registers "minicache")
