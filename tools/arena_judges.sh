#!/usr/bin/env bash
# docs/results/arena.md, "Metric judges on digits": the demo's variants plus a deliberately bad W4A4 min/max
# calibration, ranked by each metric judge (300 K = 4 matches each) on 40 items of 25 DDIM steps (the demo engines'
# calibrated grid). CPU, about 8 minutes after the demo.
#   WORK=/tmp/arena-digits bash tools/arena_judges.sh    (runs `dilatequant demo` into $WORK/demo if missing)
set -euo pipefail
work=${WORK:-/tmp/arena-digits} dq=${DQ:-dilatequant}
mkdir -p "$work"
[ -f "$work/demo/report.html" ] || $dq demo --out "$work/demo"
[ -f "$work/w4a4-minmax/manifest.json" ] || $dq calibrate --model digits --bits W4A4 --method minmax --samples 256 \
  --trajectories 16 --steps 25 --out "$work/w4a4-minmax"
variants=(--variant fp=digits --variant "fake-quant-w8a8=$work/demo/calibration" --variant "int8-engines=$work/demo/engines-int8"
          --variant "fp32-engines=$work/demo/engines-fp32" --variant "w4a4-minmax=$work/w4a4-minmax")
for judge in psnr classifier; do
  $dq arena judge --judge $judge --votes 300 "${variants[@]}" --reference fp --steps 25 --gallery "$work/gallery" \
    --db "$work/$judge.sqlite" --out "$work/leaderboard-$judge.json"
done
