"""squeezekv's benchmark runner (outside the package): ``python benchmarks/run.py SUITE --out DIR``."""
