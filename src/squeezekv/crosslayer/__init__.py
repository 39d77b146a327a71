"""Cross-layer KV sharing: architectures whose layers read keys/values computed by other layers.

* :mod:`squeezekv.crosslayer.lckv` — Layer-Condensed KV cache (Wu & Tu, ACL 2024, arXiv 2405.10637).
"""
