#!/usr/bin/env bash
# One device call: run benchmark suites by name, results under $OUT (one JSON per suite). Run from the repository
# root on the GPU machine, which reaches no registry: transformers comes from .whl/*.whl (carried), kvpress's own
# environment (transformers 5.2) from .kvp/whl/*.whl (carried; kvpress_decode cases are skipped without it).
#   bash benchmarks/device_run.sh throughput                 # one suite
#   bash benchmarks/device_run.sh decode_graph decode_long   # several, one after the other
#   TESTS=tests/test_kivi_triton.py bash benchmarks/device_run.sh channel_decode   # GPU tests first
#   CASES=standard bash benchmarks/device_run.sh lckv_small  # only some cases of a suite
#   RUN_OUT=/tmp/ro bash benchmarks/device_run.sh eval_ruler_gpu   # results in a folder that outlives the call
#                                                              # (a warm machine keeps /tmp: the next call resumes)
# The suites: `python benchmarks/run.py --list`. Set SQUEEZEKV_GIT_COMMIT=<commit> in the command when the working
# tree travels without .git, so the result records it.
set -u
export PYTHONUNBUFFERED=1
[ $# -ge 1 ] || { echo "usage: $0 SUITE [SUITE...]  (suites: python benchmarks/run.py --list)" >&2; exit 2; }
if ls .whl/*.whl >/dev/null 2>&1; then
    rm -rf /tmp/site  # a warm machine keeps the last call's wheels: install exactly the carried ones
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
if [ -d .kvp ]; then  # built by benchmarks/make_kvp_env.sh
    rm -rf /tmp/kvsite
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kvsite .kvp/whl/*.whl \
        || exit 1
    printf '#!/bin/sh\nPYTHONPATH=/tmp/kvsite:%s/.kvp/stubs exec python3 "$@"\n' "$PWD" > /tmp/kvpy
    chmod +x /tmp/kvpy
    export SQUEEZEKV_KVPRESS_PYTHON=/tmp/kvpy
fi
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -n "${TESTS:-}" ]; then
    timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider $TESTS 2>&1 | tail -n 15
fi
rc=0
for suite in "$@"; do
    python3 benchmarks/run.py "$suite" --out "${RUN_OUT:-$OUT}" ${CASES:+--cases "$CASES"} 2>&1 | grep -v -i warn | cut -c1-400
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
done
exit $rc
