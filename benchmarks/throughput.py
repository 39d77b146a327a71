"""GPU throughput and memory benchmark; the code lives in :mod:`squeezekv.bench` so `squeezekv bench` runs the same.

    python benchmarks/throughput.py --config benchmarks/throughput_config.json --out results.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from squeezekv.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
