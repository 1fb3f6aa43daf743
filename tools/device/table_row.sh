#!/usr/bin/env bash
# One job of tools/device/queue.sh: rows of a results table (`calibration_report run`) at n = N (default 5000) on
# MODEL (default digits; digits-dit for docs/results/dit.md).
#   [MODEL=digits-dit] bash tools/device/table_row.sh BITS "VARIANT[,VARIANT]" [SEED]
# Rows go to $WORK/rows/<model>-seedSEED-<bits>-<variant>.json, artifacts to $WORK/<model>-seedSEED/, and the FP
# images are read from (or, by the first job, written to) $WORK/fp-<model>-n<N>-seed<SEED>.pt. At seed 0 the rows
# file starts from the model's rows in docs/results (calibration_rows.json, dit_rows.json), so rows measured in an
# earlier session are not run again.
set -euo pipefail
bits=$1 variants=$2 seed=${3:-0} n=${N:-5000} model=${MODEL:-digits}
declare -A measured=([digits]=docs/results/calibration_rows.json [digits-dit]=docs/results/dit_rows.json)
slug=$(printf '%s' "$bits-$variants" | tr -c 'A-Za-z0-9' '-')
rows="$WORK/rows/$model-seed$seed-$slug.json"
mkdir -p "$WORK/rows"
base=${measured[$model]:-}
[ "$seed" != 0 ] || [ -f "$rows" ] || [ ! -f "$base" ] || cp "$base" "$rows"
exec python3 -m dilatequant.tools.calibration_report run --model "$model" --bits "$bits" --variants "$variants" --n "$n" \
  --seed "$seed" --device cuda --work "$WORK/$model-seed$seed" --rows "$rows" --reference "$WORK/fp-$model-n$n-seed$seed.pt"
