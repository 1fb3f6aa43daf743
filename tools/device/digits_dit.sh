#!/usr/bin/env bash
# Train `digits-dit` and measure its FP quality on the GPU machine: a job of tools/device/issue14_dit.jobs, run by
# tools/device/queue.sh (which installs the carried wheels). Writes to $WORK/dit/ and skips the parts already there,
# so a call that stops after the training goes on with the noise floor in the next one:
#   a 300-step probe, as many steps as fit TRAIN_SECONDS (tools/device/train_digits.sh), then the seed-to-seed
#   noise floor at n = 1000 (5 seeds) and n = 5000 (3 seeds), DDIM 50.
set -euo pipefail
dest=$WORK/dit
mkdir -p "$dest"
[ -f "$dest/digits-dit/training.json" ] || ARCH=digits-dit DEST=$dest SKIP_INSTALL=1 bash tools/device/train_digits.sh
floor() {  # N SEEDS
  [ -f "$dest/dit_noise_floor_n$1.json" ] || python3 -m dilatequant.tools.noise_floor --model "$dest/digits-dit" --n "$1" \
    --seeds "$2" --device cuda --batch-size 1000 --out "$dest/dit_noise_floor_n$1.json"
}
floor 1000 0,1,2,3,4
floor 5000 0,1,2
