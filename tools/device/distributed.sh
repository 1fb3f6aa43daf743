#!/usr/bin/env bash
# Distributed calibration on the 2-GPU machine (device tool, kind nvidia-h200-x2, carry .whl): wall time, phases and
# memory per rank of the same calibration on 1 and 2 GPUs (torchrun, NCCL), for docs/results/distributed.md.
#   PART=sd      (SD_GPUS, default '1 2') an SD-1.5-size UNet2DConditionModel (random weights, tools/scale.py's sd15), W8A8 dilatequant with
#                distillation (SD_ARGS)
#   PART=digits  the bundled digits model, W8A8 dilatequant (DIGITS_ARGS), then eval n=5000 of both artifacts
#   PART=exact   digits W8A8 minmax (no distillation) on 1 and 2 GPUs: are the tables and the data bit-identical?
# Writes $OUT/<name>.calibration.json, $OUT/<name>.eval.json and $OUT/times.txt (whole-command wall seconds).
set -euo pipefail
rm -rf /tmp/cal
bash tools/device/install_wheels.sh
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1
SD_ARGS=${SD_ARGS:-"--bits W8A8 --samples 128 --trajectories 16 --steps 20 --bkd-iters 100"}
DIGITS_ARGS=${DIGITS_ARGS:-"--bits W8A8 --bkd-iters 400"}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
calib() {  # name nproc model args...
  name=$1 nproc=$2 model=$3; shift 3
  start=$(date +%s.%N)
  python3 -m dilatequant calibrate --model "$model" --device cuda --nproc "$nproc" --out "/tmp/cal/$name" "$@"
  echo "$name $(python3 -c "print(round($(date +%s.%N) - $start, 1))")" | tee -a "$OUT/times.txt"
  cp "/tmp/cal/$name/calibration.json" "$OUT/$name.calibration.json"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['run']; print(sys.argv[2], r['seconds'], r.get('peak_cuda_mib'), r.get('per_rank'))" \
    "$OUT/$name.calibration.json" "$name"
}
if [ "${PART:-sd}" = sd ]; then
  python3 -c "from pathlib import Path; from dilatequant.tools.scale import build_model; print(build_model('sd15', Path('/tmp/sd15')))"
  for n in ${SD_GPUS:-1 2}; do calib "sd15-${n}gpu" "$n" /tmp/sd15 $SD_ARGS; done
elif [ "$PART" = exact ]; then
  calib minmax-1gpu 1 digits --bits W8A8 --method minmax
  calib minmax-2gpu 2 digits --bits W8A8 --method minmax
  python3 - <<'PY' | tee "$OUT/exact.txt"
from safetensors.torch import load_file
for name in ("quant_params", "calibration_data"):
    a, b = (load_file(f"/tmp/cal/minmax-{n}gpu/{name}.safetensors") for n in (1, 2))
    same = [k for k in a if a[k].equal(b[k])]
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a if a[k].is_floating_point())
    print(f"{name}: {len(same)}/{len(a)} tensors bit-identical, largest difference {worst:.3g} of the tensor's max")
PY
else
  calib digits-1gpu 1 digits $DIGITS_ARGS
  calib digits-2gpu 2 digits $DIGITS_ARGS
  for name in digits-1gpu digits-2gpu; do
    python3 -m dilatequant eval --calib "/tmp/cal/$name" --n 5000 --device cuda --out "$OUT/$name.eval.json" | tail -3
  done
fi
