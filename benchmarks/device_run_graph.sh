#!/usr/bin/env bash
# One device call: CUDA-graph static decoding vs eager squeezekv, the full cache and kvpress, same GPU, same call.
set -u
export PYTHONUNBUFFERED=1
cfg=benchmarks/throughput_config.json
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kvsite .kvp/whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ours() { PYTHONPATH=/tmp/site:src python3 benchmarks/throughput.py --config $cfg "$@" 2>&1 | grep -v -i warn; }
ours --out $OUT/decode_graph.json --only decode --batches 1,16,64,256 \
    --methods full,streamingllm:16,snapkv,streamingllm:16:graph,window:16:graph,h2o:16:graph
ours --out $OUT/maxbatch_graph.json --only maxbatch,decode --batches 1 --methods window:16:graph
PYTHONPATH=/tmp/kvsite:.kvp/stubs python3 benchmarks/kvpress_decode.py --config $cfg --batches 1,16,64,256 \
    --out $OUT/kvpress.json 2>&1 | grep -v -i warn
