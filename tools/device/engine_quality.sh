#!/usr/bin/env bash
# Quality of images sampled through ONNX Runtime engines (CPU EP, all cores) on the GPU machine, whose GPU
# calibrates (device tool, carry .whl):   N=5000 VARIANTS="name:calibrate args;..." bash tools/device/engine_quality.sh
# For each variant: calibrate on CUDA -> export ort-cpu (K buckets) -> build -> eval --engines with the FP32
# engines as the paired reference; also the torch fake-quant model on CUDA (TORCH=1). Results: $OUT/*.json.
set -euo pipefail
rm -rf /tmp/site /tmp/eq && mkdir -p /tmp/eq
bash tools/device/install_wheels.sh
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1
dq() { python3 -m dilatequant.tools.cli "$@"; }
N=${N:-5000}; STEPS=${STEPS:-25}; K=${K:-4}
dq export --model digits --out /tmp/eq/fp-export
dq build --export /tmp/eq/fp-export --out /tmp/eq/fp-engines
IFS=';' read -ra variants <<< "${VARIANTS:-quick-fp-boundary:--bkd-iters 0 --samples 512 --trajectories 32 --steps 25 --boundary fp}"
for variant in "${variants[@]}"; do
  name=${variant%%:*}; args=${variant#*:}
  start=$(date +%s)
  # shellcheck disable=SC2086
  dq calibrate --bits W8A8 $args --device cuda --out "/tmp/eq/$name-calib"
  echo "$name: calibrated in $(( $(date +%s) - start )) s"
  dq export --calib "/tmp/eq/$name-calib" --buckets "$K" --profile ort-cpu --out "/tmp/eq/$name-export"
  dq build --export "/tmp/eq/$name-export" --out "/tmp/eq/$name-engines"
  if [ "${TORCH:-0}" = 1 ]; then
    dq eval --calib "/tmp/eq/$name-calib" --n "$N" --steps "$STEPS" --device cuda --out "$OUT/torch_$name.json" > /dev/null
  fi
  start=$(date +%s)
  dq eval --engines "/tmp/eq/$name-engines" --ref /tmp/eq/fp-engines --n "$N" --steps "$STEPS" --batch-size 100 --device cpu \
    --out "$OUT/engines_$name.json" > /dev/null
  echo "$name: engines eval (with the FP32 engines as reference) in $(( $(date +%s) - start )) s"
done
