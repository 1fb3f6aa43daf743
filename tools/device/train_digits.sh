#!/usr/bin/env bash
# Train a bundled model (ARCH=digits, the default, or digits-dit) on the GPU machine (device tool), carrying .whl
# (see README "Retraining").
# A 300-step probe measures speed; the real run takes as many steps as fit TRAIN_SECONDS, so the run is
# reproducible with `python -m dilatequant.tools.train_digits --steps N` (N is in training.json).
# The model goes to $DEST/$ARCH (DEST defaults to $OUT). STEPS=N trains N steps without the probe (for a GPU
# shared with other jobs, where a probe's speed does not hold); MAX_MINUTES (default 8) stops a run early.
set -euo pipefail
bash tools/device/install_wheels.sh
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
arch=${ARCH:-digits}
if [ -z "${STEPS:-}" ]; then
  python3 -m dilatequant.tools.train_digits --arch "$arch" --out /tmp/probe --steps 300
  STEPS=$(python3 -c "import json; r=json.load(open('/tmp/probe/training.json')); print(min(30000, int(${TRAIN_SECONDS:-400} * r['steps_taken'] / r['seconds']) // 500 * 500))")
  echo "probe: $(python3 -c "import json; r=json.load(open('/tmp/probe/training.json')); print(r['steps_taken']/r['seconds'], 'steps/s')"); training $STEPS steps"
fi
python3 -m dilatequant.tools.train_digits --arch "$arch" --out "${DEST:-$OUT}/$arch" --steps "$STEPS" --max-minutes "${MAX_MINUTES:-8}"
cat "${DEST:-$OUT}/$arch/training.json"
