#!/usr/bin/env bash
# One job of tools/device/issue15_repquant_rows.jobs: the deployed form of a RepQuant row's artifact (docs/results/
# repquant.md, "Deployed"): exported with the ort-cpu profile (attention Q/DQ included, the log√2 softmax as uniform
# tables), run by the torch backend on the GPU, sampled at n = N (default 5000) against the artifact's fake-quant model.
#   MODEL=digits-dit bash tools/device/repquant_deployed.sh BITS "VARIANT"
# The torch backend runs the graphs op by op: 2.5 s per step of a 500-image batch on an H200 shared by 13 jobs
# (2026-11-29), so the job file samples N = 2000. Waits for the row's artifact (written by the table_row.sh job of
# the same bits and variant); each finished stage is kept and skipped on a rerun.
set -euo pipefail
bits=$1 variant=$2 n=${N:-5000} model=${MODEL:-digits}
slug=$(printf '%s' "$variant" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
calib="$WORK/$model-seed0/$bits-$slug" work="$WORK/deployed/$model-$bits-$slug"
cli() { python3 -m dilatequant.tools.cli "$@"; }
until [ -f "$calib/manifest.json" ]; do sleep 15; done
mkdir -p "$work" "$WORK/rows"
[ -f "$work/export/manifest.json" ] || cli export --calib "$calib" --profile ort-cpu --out "$work/export"
[ -f "$work/engines/manifest.json" ] || cli build --export "$work/export" --backend torch --provider cuda --out "$work/engines"
cli eval --engines "$work/engines" --ref "$calib" --n "$n" --steps 50 --seed 0 --device cuda --out "$WORK/rows/deployed-$model-$bits-$slug.json"
