#!/usr/bin/env bash
# FP quality and seed-to-seed noise floor of the bundled model on the GPU machine (device tool, carry .whl):
# DDIM 50 steps, n = 1000 (5 seeds) and n = 5000 (3 seeds). Results land in $OUT.
set -euo pipefail
rm -rf /tmp/site
bash tools/device/install_wheels.sh
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m dilatequant.tools.noise_floor --n 1000 --seeds 0,1,2,3,4 --device cuda --out "$OUT/noise_floor_n1000.json"
python3 -m dilatequant.tools.noise_floor --n 5000 --seeds 0,1,2 --device cuda --batch-size 1000 --out "$OUT/noise_floor_n5000.json"
