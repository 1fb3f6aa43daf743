#!/usr/bin/env bash
# One job of tools/device/queue.sh: rows of the calibration table (`calibration_report run`) at n = N (default 5000).
#   bash tools/device/table_row.sh BITS "VARIANT[,VARIANT]" [SEED]
# Rows go to $WORK/rows/seedSEED-<bits>-<variant>.json, artifacts to $WORK/table-seedSEED/, and the FP images of that
# seed are read from (or, by the first job, written to) $WORK/fp-n<N>-seed<SEED>.pt. At seed 0 the rows file starts
# from docs/results/calibration_rows.json, so rows measured in an earlier session are not run again.
set -euo pipefail
bits=$1 variants=$2 seed=${3:-0} n=${N:-5000}
slug=$(printf '%s' "$bits-$variants" | tr -c 'A-Za-z0-9' '-')
rows="$WORK/rows/seed$seed-$slug.json"
mkdir -p "$WORK/rows"
[ "$seed" != 0 ] || [ -f "$rows" ] || cp docs/results/calibration_rows.json "$rows"
exec python3 -m dilatequant.tools.calibration_report run --bits "$bits" --variants "$variants" --n "$n" --seed "$seed" \
  --device cuda --work "$WORK/table-seed$seed" --rows "$rows" --reference "$WORK/fp-n$n-seed$seed.pt"
