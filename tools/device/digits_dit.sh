#!/usr/bin/env bash
# Train `digits-dit` and measure its FP quality on the GPU machine (carry .whl): a job of tools/device/issue14_dit.jobs,
# or detached beside another queue so that it outlives the call (the machine keeps it while warm):
#   STEPS=5000 MAX_MINUTES=14 WORK=$PWD/.device-work setsid nohup bash tools/device/digits_dit.sh > dit.log 2>&1 < /dev/null &
# Writes to $WORK/dit/ and skips the parts already there, so a stopped run goes on with what is missing:
#   a 300-step probe, as many steps as fit TRAIN_SECONDS (tools/device/train_digits.sh), then the seed-to-seed
#   noise floor at n = 1000 (5 seeds) and n = 5000 (3 seeds), DDIM 50.
set -euo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
dest=$WORK/dit
mkdir -p "$dest"
[ -f "$dest/digits-dit/training.json" ] || ARCH=digits-dit DEST=$dest bash tools/device/train_digits.sh
floor() {  # N SEEDS
  [ -f "$dest/dit_noise_floor_n$1.json" ] || python3 -m dilatequant.tools.noise_floor --model "$dest/digits-dit" --n "$1" \
    --seeds "$2" --device cuda --batch-size 1000 --out "$dest/dit_noise_floor_n$1.json"
}
floor 1000 0,1,2,3,4
floor 5000 0,1,2
touch "$dest/finished"
