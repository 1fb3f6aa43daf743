#!/usr/bin/env bash
# Why per-timestep min/max tables (TPQ) without distillation lost to one shared range at W8A8 in
# docs/results/calibration.md (fid_digits 3.98 vs 3.59 at n = 5000): the same comparison, plus TPQ with more
# samples per timestep and with the same count per timestep. Device tool, carry .whl. Writes $OUT/<row>.json.
set -euo pipefail
rm -rf /tmp/site /tmp/tpq
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
dq() { python3 -m dilatequant.tools.cli "$@" 2>&1 | grep -v "it/s\]\|step/s\]\|s/it\]"; }
row() {
  name=$1; shift
  dq calibrate --model digits --bits W8A8 --method minmax --no-dilation --device cuda --out "/tmp/tpq/$name" "$@"
  dq eval --calib "/tmp/tpq/$name" --ref digits --n "${N:-5000}" --device cuda --out "$OUT/$name.json"
}
row shared-1024 --no-tpq
row tpq-1024
row tpq-5120 --samples 5120 --trajectories 128
row tpq-uniform-1024 --data-selection uniform
