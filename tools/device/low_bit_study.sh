#!/usr/bin/env bash
# Which parts make DilateQuant work at low bits (issue 13): calibrations of `digits` run side by side on one
# GPU (each is launch-bound, so several share it well), each evaluated against FP on paired noise.
#   bash tools/device/low_bit_study.sh tools/device/low_bit_sweep_2.txt   (lines "name bits calibrate-options...")
#   P=6 concurrent jobs (the first runs alone unless ALONE_FIRST=0: its timings are clean), N=2000 images per evaluation, LIMIT=520 s before unfinished jobs are stopped.
# Device tool, carry .whl. Everything lands in $OUT/low_bit.tgz (<name>.json: evaluation, <name>.calibration.json,
# <name>.log), with $OUT/summary.txt.
set -uo pipefail
rm -rf /tmp/site /tmp/lb && mkdir -p /tmp/lb/out
bash tools/device/install_wheels.sh
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1
start=$(date +%s)
res=/tmp/lb/out

if [ "${GPU_TESTS:-1}" = 1 ] && python3 -c "import pytest" 2> /dev/null; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_graph.py > "$res/gpu_tests.log" 2>&1
  tail -3 "$res/gpu_tests.log"
fi

gpus=$(nvidia-smi -L 2> /dev/null | wc -l) && [ "$gpus" -gt 0 ] || gpus=1  # jobs go round-robin over the machine's GPUs
launched=0
job() {
  local name=$1 bits=$2
  shift 2
  export CUDA_VISIBLE_DEVICES=$((launched % gpus))
  {
    python3 -m dilatequant.tools.cli calibrate --model digits --bits "$bits" --device cuda --out "/tmp/lb/$name" "$@" &&
      cp "/tmp/lb/$name/calibration.json" "$res/$name.calibration.json" &&
      python3 -m dilatequant.tools.cli eval --calib "/tmp/lb/$name" --ref digits --n "${N:-2000}" --device cuda --out "$res/$name.json"
  } > "$res/$name.log" 2>&1
  echo "$name done (rc $?, $(($(date +%s) - start)) s)"
}

first=1
while read -r name bits options; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  # shellcheck disable=SC2086  # options are words
  if [ "$first" = 1 ] && [ "${ALONE_FIRST:-1}" = 1 ]; then first=0 && job "$name" "$bits" $options && launched=$((launched + 1)) && continue; fi
  while [ "$(jobs -rp | wc -l)" -ge "${P:-6}" ]; do wait -n; done
  if [ $(($(date +%s) - start)) -gt "${LIMIT:-520}" ]; then echo "out of time before $name"; break; fi
  # shellcheck disable=SC2086  # options are words
  job "$name" "$bits" $options &
  launched=$((launched + 1))
done < "$1"
( sleep $((${LIMIT:-520} + 40 - ($(date +%s) - start))) && pkill -f dilatequant.tools.cli ) 2> /dev/null &
watchdog=$!
while [ "$(jobs -rp | grep -vc "^$watchdog$")" -gt 0 ]; do wait -n; done
kill "$watchdog" 2> /dev/null

python3 - "$res" > "$res/summary.txt" << 'EOF'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.calibration.json")):
    name = path.name.removesuffix(".calibration.json")
    record = json.loads(path.read_text())
    blocks = record["statistics"].get("blocks", {}).values()
    seconds = record["run"]["seconds"]
    evaluation = Path(sys.argv[1]) / f"{name}.json"
    metrics = json.loads(evaluation.read_text()) if evaluation.is_file() else {}
    print(name, f"fid {metrics.get('fid_digits', float('nan')):.2f}", f"acc {metrics.get('class_accuracy', float('nan')):.3f}",
          f"psnr {metrics.get('psnr_vs_ref', float('nan')):.2f}", "seconds", json.dumps(seconds),
          "graphs", sum(bool(b.get("cuda_graph")) for b in blocks), "/", len(blocks),
          "peak MiB", max((b.get("peak_cuda_mib", 0) for b in blocks), default=0))
EOF
cat "$res/summary.txt"
tar czf "$OUT/low_bit.tgz" -C "$res" .
cp "$res/summary.txt" "$OUT/"
