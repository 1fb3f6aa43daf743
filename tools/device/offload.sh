#!/usr/bin/env bash
# Offloaded distillation on one H200 (device tool, carry .whl with pytest's wheels beside diffusers'): the GPU tests
# of tests/test_offload.py, then the same distillation with --bkd-offload off and on, for docs/results/offload.md.
#   PART=sd15  an SD-1.5-size UNet2DConditionModel (random weights, tools/scale.py's configs), W8A8 dilatequant (ARGS)
#   PART=sdxl  the SDXL-size one
#   MODES      which --bkd-offload runs (default 'off on'); TESTS=0 skips the pytest run
# Writes $OUT/<part>-<mode>.calibration.json, $OUT/times.txt (whole-command wall seconds) and $OUT/same.txt (whether
# the artifacts' tensors are bit-identical).
set -euo pipefail
bash tools/device/install_wheels.sh
export PYTHONPATH=/tmp/site:$PWD/tests PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PART=${PART:-sd15}
ARGS=${ARGS:-"--bits W8A8 --samples 64 --trajectories 8 --steps 10 --bkd-iters 50 --act-init minmax"}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${TESTS:-1}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider -m "${TEST_MARK:-gpu or not gpu}" tests/test_offload.py > "$OUT/tests.txt" 2>&1 || true
  tail -3 "$OUT/tests.txt"
fi
model=/tmp/$PART
[ -d "$model" ] || python3 -c "from pathlib import Path; from dilatequant.tools.scale import build_model; print(build_model('$PART', Path('$model')))"
for mode in ${MODES:-off on}; do
  rm -rf "/tmp/cal/$PART-$mode" "/tmp/cal/$PART-$mode.work"  # a whole run each time, not one resumed from a killed one
  start=$(date +%s.%N)
  python3 -m dilatequant calibrate --model "$model" --device cuda --bkd-offload "$mode" --out "/tmp/cal/$PART-$mode" $ARGS
  echo "$PART-$mode $(python3 -c "print(round($(date +%s.%N) - $start, 1))")" | tee -a "$OUT/times.txt"
  cp "/tmp/cal/$PART-$mode/calibration.json" "$OUT/$PART-$mode.calibration.json"
  python3 -c "import json,sys; c=json.load(open(sys.argv[1])); r=c['run']; b=[(v['peak_cuda_mib'], v['start_cuda_mib']) for v in c['statistics']['blocks'].values() if 'peak_cuda_mib' in v]; print(sys.argv[2], r['seconds'], r.get('peak_cuda_mib'), 'block peak, held', max(b), max(x[1] for x in b), r['peak_rss_mib'], r.get('bkd_offload'))" \
    "$OUT/$PART-$mode.calibration.json" "$PART-$mode"
done
if [ -d "/tmp/cal/$PART-off" ] && [ -d "/tmp/cal/$PART-on" ]; then
  python3 - "$PART" <<'PY' | tee -a "$OUT/same.txt"
import sys
from safetensors.torch import load_file
part = sys.argv[1]
for name in ("quant_params.safetensors", "model/diffusion_pytorch_model.safetensors"):
    a, b = (load_file(f"/tmp/cal/{part}-{mode}/{name}") for mode in ("off", "on"))
    print(f"{part} {name}: {sum(a[k].equal(b[k]) for k in a)}/{len(a)} tensors bit-identical")
PY
fi
