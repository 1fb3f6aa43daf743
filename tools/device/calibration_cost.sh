#!/usr/bin/env bash
# Calibration cost on the GPU machine (device tool, carry .whl): seconds per phase and peak memory of
#   - DilateQuant W8A8 with its defaults (the recipe of docs/results/calibration.md), and
#   - EDA-DM W8A8 with BKD_ITERS iterations per block (default 500; its recipe runs 5000: scale the distillation).
# Writes $OUT/<name>.calibration.json (the artifacts' records) and prints each run's phases.
set -euo pipefail
rm -rf /tmp/site /tmp/cal
bash tools/device/install_wheels.sh
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1
run() {
  name=$1; shift
  python3 -m dilatequant.tools.cli calibrate --model digits --bits W8A8 --device cuda --out "/tmp/cal/$name" "$@"
  cp "/tmp/cal/$name/calibration.json" "$OUT/$name.calibration.json"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['run']; print(sys.argv[2], r['seconds'], r.get('peak_cuda_mib'))" \
    "$OUT/$name.calibration.json" "$name"
}
run dilatequant
run eda-dm --method eda-dm --bkd-iters "${BKD_ITERS:-500}"
