#!/usr/bin/env bash
# Train `digits-dit` and measure its FP quality on the GPU machine (device tool, carry .whl): a 300-step probe, as
# many steps as fit TRAIN_SECONDS (tools/device/train_digits.sh), then the seed-to-seed noise floor at n = 1000
# (5 seeds) and n = 5000 (3 seeds), DDIM 50. The device tool returns files of at most 16 MiB, so the model comes
# back as $OUT/digits-dit.tgz.part-*; unpack it into the zoo with
#   cat digits-dit.tgz.part-* | tar xz -C core/assets
set -euo pipefail
ARCH=digits-dit bash tools/device/train_digits.sh
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1  # installed by train_digits.sh
python3 -m dilatequant.tools.noise_floor --model "$OUT/digits-dit" --n 1000 --seeds 0,1,2,3,4 --device cuda --out "$OUT/dit_noise_floor_n1000.json"
python3 -m dilatequant.tools.noise_floor --model "$OUT/digits-dit" --n 5000 --seeds 0,1,2 --device cuda --batch-size 1000 \
  --out "$OUT/dit_noise_floor_n5000.json"
tar czf - -C "$OUT" digits-dit | split -b 15M - "$OUT/digits-dit.tgz.part-"
rm -rf "${OUT:?}/digits-dit"
ls -l "$OUT"
