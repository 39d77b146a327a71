#!/usr/bin/env bash
# Build .kvp/, kvpress's own environment for the GPU machine (which reaches no package registry), from PyPI:
#   .kvp/whl/    kvpress 0.5.5 and what it needs at import time that the GPU machine lacks or has in a version
#                transformers 5.2 refuses (its import checks tokenizers <= 0.23.0; the machine's transformers 5.17
#                comes with tokenizers 0.23.x): transformers 5.2.0, tokenizers 0.22.2 (manylinux x86_64, python 3.12),
#                cachetools, fire (built from its sdist) with six and termcolor. No torch: the machine's is used.
#   .kvp/stubs/  stand-ins for imports kvpress makes at import time that the decode worker never uses
#                (datasets: benchmarks/kvp_stubs/; anything used from one raises).
# benchmarks/device_run.sh installs .kvp/whl into /tmp/kvsite and runs the kvpress_decode worker with
# PYTHONPATH=/tmp/kvsite:.kvp/stubs. Run from the repository root; carry .kvp with the device call.
#   bash benchmarks/make_kvp_env.sh            # about 14 MB
#   bash benchmarks/make_kvp_env.sh --check    # also import kvpress the way the GPU machine will (this python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .kvp
mkdir -p .kvp/whl
dl() { "$PY" -m pip download -q --no-deps --only-binary=:all: -d .kvp/whl "$@"; }
dl "kvpress==0.5.5" "transformers==5.2.0" "cachetools==5.5.2" "six==1.17.0" "termcolor==3.3.0"
dl --platform manylinux2014_x86_64 --python-version 3.12 --implementation cp "tokenizers==0.22.2"
"$PY" -m pip wheel -q --no-deps -w .kvp/whl "fire==0.6.0"  # published as an sdist only; pure python
cp -r benchmarks/kvp_stubs .kvp/stubs
find .kvp/stubs -name __pycache__ -prune -exec rm -rf {} +
ls .kvp/whl
du -sh .kvp
if [ "${1:-}" = "--check" ]; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .kvp/whl/*.whl
    PYTHONPATH="$site:$PWD/.kvp/stubs" "$PY" -c \
        "import kvpress, transformers; print('kvpress imports; transformers', transformers.__version__)"
    rm -rf "$site"
fi
