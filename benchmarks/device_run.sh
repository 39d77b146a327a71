#!/usr/bin/env bash
# One device call: squeezekv's throughput (transformers 5.24 from .whl) and kvpress's (its own transformers 5.2 from
# .kvp/whl) on the same GPU, results under $OUT. Run from the repository root on the GPU machine.
#   bash benchmarks/device_run.sh          # run 1: prefill, max batch, eager decode, kvpress
#   bash benchmarks/device_run.sh graph    # run 2: CUDA-graph static decoding vs eager, full cache and kvpress
#   bash benchmarks/device_run.sh long     # run 3: 256 decoded tokens per repetition (full, graph, kvpress)
set -u
export PYTHONUNBUFFERED=1
cfg=benchmarks/throughput_config.json
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
[ -d .kvp ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kvsite \
    .kvp/whl/*.whl || exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ours() { PYTHONPATH=/tmp/site:src python3 benchmarks/throughput.py --config $cfg "$@" 2>&1 | grep -v -i warn; }
kvpress() {
    PYTHONPATH=/tmp/kvsite:.kvp/stubs python3 benchmarks/kvpress_decode.py --config $cfg --batches "$1" \
        --out $OUT/kvpress.json 2>&1 | grep -v -i warn
}
py() { PYTHONPATH=/tmp/site:src timeout "$1" python3 "${@:2}" 2>&1 | grep -v -i warn | cut -c1-400 | tail -12; }
if [ "${1:-}" = session7 ]; then
    # issue 8: the fused Triton KIVI kernel: its GPU tests, then decode tokens/s (torch path vs fused, with a kernel
    # sweep and a fused-vs-torch check in the JSON) and max batch (.whl also holds pytest's wheels)
    PYTHONPATH=/tmp/site:src timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kivi_triton.py \
        2>&1 | tail -n 15
    mkdir -p $OUT/decode
    py 400 benchmarks/channel_throughput.py --out $OUT/decode --batches 1,16,64 --only decode \
        --methods full,kivi2,kivi2-fused,kivi4-fused,snapkv0.3,snapkv0.3+kivi2,snapkv0.3+kivi2-fused
    exit 0
fi
if [ "${1:-}" = session8 ]; then
    # issue 8, faster fused KIVI decoding (one call, < 4 min): GPU tests of the fused residual (bf16, all three
    # variants) and tiny-model decoding, then the check (fused vs state+torch-residual vs torch path), the kernel
    # sweep (variants x block/warps x programs per SM at batches 1/16/64, 2 and 4 bits) and decode at 1/16/64
    PYTHONPATH=/tmp/site:src timeout 50 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kivi_triton.py \
        -k "(fused_residual_attend and dtype1) or tiny_model" 2>&1 | tail -n 15
    mkdir -p $OUT/decode
    py 185 benchmarks/channel_throughput.py --out $OUT/decode --batches 1,16,64 --only decode \
        --methods full,kivi2-fused,kivi4-fused,snapkv0.3+kivi2-fused,kivi2-fused-1launch
    exit 0
fi
if [ "${1:-}" = session8t ]; then
    # issue 8: the whole GPU test file (all variants, dtypes, residual lengths; several minutes of compiling)
    PYTHONPATH=/tmp/site:src timeout 500 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kivi_triton.py \
        2>&1 | tail -n 25
    exit 0
fi
if [ "${1:-}" = session7mb ]; then
    mkdir -p $OUT/maxbatch
    py 500 benchmarks/channel_throughput.py --out $OUT/maxbatch --only maxbatch --no-check --max-probes 5 \
        --max-batch-hi 2048 --methods full,kivi2-fused,kivi4-fused,snapkv0.3,snapkv0.3+kivi2-fused
    exit 0
fi
if [ "${1:-}" = session5 ]; then
    # chunked prefill after the bottom-right causal fix (8k, 32k) and the multi-user replay with roomier tiers
    ours --out $OUT/prefill_chunked.json --only prefill --methods full,streamingllm,snapkv,h2o \
        --prefill-contexts 8192,32768 --prefill-chunks 1024,4096
    py 200 benchmarks/serving_multiuser.py --device cuda --random-config $cfg --conversations 64 --turns 4 \
        --history 1024 --gpu-gib 6 --cpu-gib 12 --disk-gib 32 --methods full,snapkv --time-limit 90 \
        --out $OUT/multiuser.json
    exit 0
fi
if [ "${1:-}" = session6 ]; then
    # decode speed of the cross-layer and channel methods vs the full cache (8B shape, random weights)
    py 110 benchmarks/shared_attention_decode.py --out $OUT --batches 1,16 --shared 8,16 --reps 3
    py 90 benchmarks/channel_throughput.py --out $OUT --batches 1,32 --only decode
    py 70 benchmarks/eigen_decode.py --config $cfg --out $OUT --context 8192 --batches 1,16 --ranks 64
    py 70 benchmarks/minicache_gpu.py --out $OUT --batches 1,8
    exit 0
fi
if [ "${1:-}" = session4 ]; then
    # chunked prefill (peak memory and time, 8k and 32k), multi-user serving replay, Eigen Attention decode
    ours --out $OUT/prefill_chunked.json --only prefill --methods full,streamingllm,snapkv,h2o \
        --prefill-contexts 8192,32768 --prefill-chunks 1024,4096
    PYTHONPATH=/tmp/site:src python3 benchmarks/serving_multiuser.py --device cuda --random-config $cfg \
        --conversations 64 --turns 5 --history 1024 --gpu-gib 2 --cpu-gib 4 --disk-gib 8 --methods full,snapkv \
        --out $OUT/multiuser.json 2>&1 | grep -v -i warn | cut -c1-600
    PYTHONPATH=/tmp/site:src python3 benchmarks/eigen_decode.py --config $cfg --out $OUT/eigen --context 8192 \
        --batches 1,16 --ranks 64,96 2>&1 | grep -v -i warn | tail -20
    exit 0
fi
if [ "${1:-}" = long ]; then
    ours --out $OUT/decode256.json --only decode --decode-steps 256 --batches 16,64,256 \
        --methods full,streamingllm:16:graph
    PYTHONPATH=/tmp/kvsite:.kvp/stubs python3 benchmarks/kvpress_decode.py --config $cfg --batches 16,64,256 \
        --presses StreamingLLMPress --decode-steps 256 --out $OUT/kvpress256.json 2>&1 | grep -v -i warn
    exit 0
fi
if [ "${1:-}" = graph ]; then
    ours --out $OUT/decode_graph.json --only decode --batches 1,16,64,256 \
        --methods full,streamingllm:16,snapkv,streamingllm:16:graph,window:16:graph,h2o:16:graph
    ours --out $OUT/maxbatch_graph.json --only maxbatch,decode --batches 1 --methods window:16:graph
    kvpress 1,16,64,256
    exit 0
fi
if [ "${1:-}" = cq ]; then
    # issue 8, Coupled Quantization: decode tokens/s at batch 1/16/64 and max batch vs the full cache, torch path vs
    # the fused Triton kernel (random codebooks; results saved after each measurement, so a timeout keeps them)
    mkdir -p $OUT/cq
    py 170 benchmarks/channel_throughput.py --out $OUT/cq --no-check --batches 1,16,64 --steps 8 --max-probes 3 \
        --methods full,cq2,cq2-fused,cq1-fused,snapkv0.3+cq2-fused
    exit 0
fi
if [ "${1:-}" = cqk ]; then
    # the fused CQ kernel: its GPU tests, then the kernel alone (block/warps/programs-per-SM sweep) vs torch and SDPA
    PYTHONPATH=/tmp/site:src timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_coupled_triton.py \
        2>&1 | tail -n 15
    mkdir -p $OUT/cqk
    py 80 benchmarks/cq_kernel_sweep.py --out $OUT/cqk --batches 1,64
    exit 0
fi
ours --out $OUT/prefill.json --only prefill --methods full,window,streamingllm,h2o,snapkv
ours --out $OUT/decode_maxbatch.json --only maxbatch,decode --methods full,window:16 --batches 16,64,256
ours --out $OUT/decode.json --only decode --methods streamingllm:16,h2o:16,snapkv --batches 16,64,256
kvpress 16,64,256
