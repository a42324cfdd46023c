#!/usr/bin/env bash
# `make wheel-check`: the wheel a user installs works away from the checkout. Builds an sdist of the tree
# and the wheel from it, installs the wheel (--no-deps) into a fresh venv in a temp folder next to the
# locked dependencies and torch, then runs `make demo`'s commands scaled down from another temp folder:
# presets, stored calibrations, the gate's tolerances and tokcomp-tiny must all come from the wheel.
# Env: BIN (the project venv's bin), LOCK, TORCH_SPEC, FIND_LINKS (optional, for torch).
set -euo pipefail

repo=$(pwd)
BIN=$(cd "${BIN:?}" && pwd)
LOCK=$(realpath "${LOCK:?}")
TORCH_SPEC=${TORCH_SPEC:?}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tokcomp-wheel-check.XXXXXX")
ok=0
finish() { if [ "$ok" = 1 ]; then rm -rf "$tmp"; else echo "wheel-check: FAILED; its files are in $tmp" >&2; fi; }
trap finish EXIT
step() { echo "wheel-check: $*"; }

step "building the sdist and the wheel from it"
"$BIN/uv" build -q --python "$BIN/python" --no-build-isolation --out-dir "$tmp/dist"
wheel=$(ls "$tmp"/dist/tokcomp-*.whl)
# The data the wheel carries; the wheel's size is printed so a bloated one shows in CI logs.
"$BIN/python" - "$wheel" <<'EOF'
import sys, zipfile
from pathlib import Path
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["configs/dymu-mid.yaml", "configs/regress-tolerances.yaml", "calib/tokcomp-tiny/mid.yaml",
        "checkpoints/tokcomp-tiny/model.safetensors", "checkpoints/tokcomp-tiny/config.json"]
missing = [n for n in need if f"tokcomp/_data/{n}" not in names]
if missing:
    sys.exit(f"wheel-check: the wheel lacks {', '.join(missing)} under tokcomp/_data/")
size = Path(sys.argv[1]).stat().st_size / 2**20
print(f"wheel-check: {Path(sys.argv[1]).name}: {size:.1f} MiB, {len(names)} files")
EOF

step "a fresh venv with the locked dependencies, torch and the wheel"
"$BIN/uv" venv -q --python "$BIN/python" "$tmp/venv"
py=$tmp/venv/bin/python
"$BIN/uv" pip install -q --python "$py" --require-hashes --no-deps -r "$LOCK"
"$BIN/uv" pip install -q --python "$py" --no-deps ${FIND_LINKS:+--find-links "$FIND_LINKS"} "$TORCH_SPEC"
"$BIN/uv" pip install -q --python "$py" --no-deps "$wheel"

mkdir "$tmp/work" && cd "$tmp/work"
export TOKCOMP_HOME=$tmp/home HF_HOME=$tmp/hf
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$py" - "$site" <<'EOF'
import sys
from tokcomp import resources
from tokcomp.models.loading import COMMITTED
from tokcomp.results.regress import default_tolerances_path
site = sys.argv[1]
found = {p: resources.find(*p.split("/")) for p in ("configs/dymu-mid.yaml", "calib/tokcomp-tiny/mid.yaml")}
found["checkpoints/tokcomp-tiny"] = COMMITTED["tokcomp-tiny"]
found["configs/regress-tolerances.yaml"] = default_tolerances_path()
wrong = {p: str(f) for p, f in found.items() if f is None or not str(f).startswith(site)}
if resources.in_checkout() or wrong:
    sys.exit(f"wheel-check: tokcomp does not read its data from the installed wheel ({site}): {wrong}")
EOF

tok=$tmp/venv/bin/tokcomp
step "calibrate, inspect, eval (a stored calibration by preset, and the plain model), report, regress, methods"
"$tok" calibrate --model tokcomp-tiny --budget mid --data builtin:tasks/8 --out calib-mid.yaml
"$tok" inspect builtin:tasks/1 --model tokcomp-tiny --calib calib-mid.yaml --out merges.png
"$tok" eval --model tokcomp-tiny --method dymu-mid --task tc_shapes --limit 2 --out runs/dymu-mid
"$tok" eval --model tokcomp-tiny --method none --task tc_shapes --limit 2 --out runs/none
"$tok" report runs/dymu-mid runs/none --plot accuracy-vs-tokens.png
"$tok" regress --baseline runs/none --current runs/none
grep -q "$site/tokcomp/_data/calib/tokcomp-tiny/mid.yaml" runs/dymu-mid/*.json \
  || { echo "wheel-check: eval --method dymu-mid did not record the wheel's stored calibration" >&2; exit 1; }
"$tok" methods --json > methods.json
"$py" - "$(ls "$repo"/configs/*.yaml | wc -l)" <<'EOF'
import json, sys
presets = json.load(open("methods.json"))["presets"]
if "dymu-mid" not in presets or len(presets) < int(sys.argv[1]) - 1:
    sys.exit(f"wheel-check: tokcomp methods lists {len(presets)} presets: {sorted(presets)}")
EOF
"$tok" methods > /dev/null
for f in merges.png accuracy-vs-tokens.png; do test -s "$f" || { echo "wheel-check: no $f" >&2; exit 1; }; done
ok=1
step "passed"
