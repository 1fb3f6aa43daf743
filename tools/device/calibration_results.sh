#!/usr/bin/env bash
# One bit width of docs/results/calibration.md on the GPU machine (device tool, carry .whl):
#   bash tools/device/calibration_results.sh W8A8
# VARIANTS="name,name" limits the rows; BKD_ITERS overrides every distilling recipe's iterations; MEMORY=1 also measures distillation memory ($OUT/bkd_memory.json).
# Rows already in docs/results/calibration_rows.json are skipped; the updated file lands in $OUT/rows.json.
set -euo pipefail
rm -rf /tmp/site
bash tools/device/install_wheels.sh
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -f docs/results/calibration_rows.json ]; then cp docs/results/calibration_rows.json "$OUT/rows.json"; fi
if [ "${MEMORY:-0}" = 1 ]; then
  python3 -m dilatequant.tools.calibration_report memory --device cuda --out "$OUT/bkd_memory.json"
fi
python3 -m dilatequant.tools.calibration_report run --bits "$1" --n "${N:-5000}" ${BKD_ITERS:+--bkd-iters "$BKD_ITERS"} \
  ${VARIANTS:+--variants "$VARIANTS"} --device cuda --work /tmp/calwork --rows "$OUT/rows.json"
