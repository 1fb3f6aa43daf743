#!/usr/bin/env bash
# Issue 11, item 4 on the GPU machine (device tool, carry .whl: diffusers, huggingface_hub 1.33.0, click, hf-xet,
# onnx_graphsurgeon, the dilatequant wheel):   BITS="W8A8 W4A8" bash tools/device/deployed_scales.sh
# Per bit width: calibrate digits with distillation (BKD_ITERS per block, default 400) on CUDA on a STEPS grid;
# for each K in KS (default "4 25": 25 = one bucket per timestep) export twice, with the calibrated (learned)
# activation rows and with rows re-derived from the calibration data (the old behaviour); run both through the
# torch backend on the GPU; sample n = N with the fake-quant model as the paired reference.
# Results: $OUT/<bits>_fakequant.json (against FP) and $OUT/<bits>_k<K>_<scales>.json (against fake-quant).
set -euo pipefail
rm -rf /tmp/site /tmp/ds && mkdir -p /tmp/ds
bash tools/device/install_wheels.sh
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1
dq() { python3 -m dilatequant.tools.cli "$@" 2>&1 | sed "/W:onnxruntime/d" | while IFS= read -r line; do echo "$(date +%T) $line"; done; }
N=${N:-5000}; STEPS=${STEPS:-25}
for bits in ${BITS:-W8A8}; do
  calib=/tmp/ds/$bits-calib
  dq calibrate --model digits --bits "$bits" --steps "$STEPS" --bkd-iters "${BKD_ITERS:-400}" --device cuda --out "$calib"
  dq eval --calib "$calib" --n "$N" --steps "$STEPS" --device cuda --out "$OUT/${bits}_fakequant.json"
  for k in ${KS:-4 25}; do
    for scales in calibrated rederived; do
      name=$bits-k$k-$scales
      dq export --calib "$calib" --buckets "$k" --profile ort-cpu --scales "$scales" --out "/tmp/ds/$name-export"
      dq build --export "/tmp/ds/$name-export" --backend torch --provider cuda --out "/tmp/ds/$name-engines"
      dq eval --engines "/tmp/ds/$name-engines" --ref "$calib" --n "$N" --steps "$STEPS" --device cuda \
        --out "$OUT/${bits}_k${k}_$scales.json"
    done
  done
done
