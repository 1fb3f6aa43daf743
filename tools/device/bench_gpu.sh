#!/usr/bin/env bash
# The GPU section of docs/BENCHMARKS.md (device tool, carry .whl: diffusers, onnx_graphsurgeon, nvidia-modelopt
# and its missing needs, the dilatequant wheel):
#   ENTRIES=... bash tools/device/bench_gpu.sh
# Every entry's deployed ONNX graph sampled by the torch backend on the GPU (n = 5000, DDIM 25), dilatequant
# calibrated on the GPU with distillation (BKD_ITERS, default 400). ENTRIES (comma-separated) runs a subset,
# so that the whole comparison fits the device's 10-minute calls; FP32 runs in every part (the PSNR
# reference; it is deterministic, so its row must come out the same in each). Results: $OUT/bench.json|md.
set -euo pipefail
rm -rf /tmp/site /tmp/bench
bash tools/device/install_wheels.sh
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1
python3 -m dilatequant.tools.bench --out /tmp/bench --backend torch --device cuda --n "${N:-5000}" \
  --bkd-iters "${BKD_ITERS:-400}" ${ENTRIES:+--entries "$ENTRIES"} 2>&1 | grep --line-buffered -v "W:onnxruntime" |
  while IFS= read -r line; do echo "$(date +%T) $line"; done
cp /tmp/bench/bench.json /tmp/bench/bench.md "$OUT/"
