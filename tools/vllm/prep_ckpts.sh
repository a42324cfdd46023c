#!/bin/bash
# Usage: prep_ckpts.sh <tokcomp tiny-qwen2.5-vl dir> <tokcomp tiny-llava-ov dir> <out dir> <venv python with transformers>
set -euo pipefail
Q=$1; O=$2; OUT=$3; PY=$4; S=$(dirname "$0")
rm -rf "$OUT/qwen" "$OUT/ov"; mkdir -p "$OUT"; cp -r "$Q" "$OUT/qwen"; cp -r "$O" "$OUT/ov"
"$PY" "$S/hd32.py" "$OUT/qwen"; "$PY" "$S/hd32.py" "$OUT/ov"
"$PY" "$S/add_ov_processor.py" "$OUT/ov" > /dev/null
"$PY" "$S/remap_ov_keys.py" "$OUT/ov"
