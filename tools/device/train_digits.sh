#!/usr/bin/env bash
# Train a bundled model (ARCH=digits, the default, or digits-dit) on the GPU machine (device tool), carrying .whl
# (see README "Retraining").
# A 300-step probe measures speed; the real run takes as many steps as fit TRAIN_SECONDS, so the run is
# reproducible with `python -m dilatequant.tools.train_digits --steps N` (N is in training.json).
# The model goes to $DEST/$ARCH (DEST defaults to $OUT); SKIP_INSTALL=1 when the wheels are installed already.
set -euo pipefail
if [ -z "${SKIP_INSTALL:-}" ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
arch=${ARCH:-digits}
python3 -m dilatequant.tools.train_digits --arch "$arch" --out /tmp/probe --steps 300
steps=$(python3 -c "import json; r=json.load(open('/tmp/probe/training.json')); print(min(30000, int(${TRAIN_SECONDS:-400} * r['steps_taken'] / r['seconds']) // 500 * 500))")
echo "probe: $(python3 -c "import json; r=json.load(open('/tmp/probe/training.json')); print(r['steps_taken']/r['seconds'], 'steps/s')"); training $steps steps"
python3 -m dilatequant.tools.train_digits --arch "$arch" --out "${DEST:-$OUT}/$arch" --steps "$steps" --max-minutes 8
cat "${DEST:-$OUT}/$arch/training.json"
