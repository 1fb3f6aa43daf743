#!/usr/bin/env bash
# The deployed Q-DiT W4A8 graphs (ort-dynamic: MatMulNBits with dynamic int8 inputs) on ONNX Runtime CPU against
# their fake-quantized model, from the same noise, at n = N (default 1000): docs/results/dit.md, "Deployed graphs".
#   WORK=/tmp/dep DEVICE=cpu bash tools/device/dit_deployed.sh       (2-core CPU: about 5 + 19 + 65 min)
# Calibrates the artifact into $WORK/calib unless CALIB names one; each finished stage is kept and skipped on a rerun.
set -euo pipefail
n=${N:-1000} device=${DEVICE:-cpu} work=${WORK:?set WORK to a working directory}
calib=${CALIB:-$work/calib}
cli() { python3 -m dilatequant.tools.cli "$@"; }
[ -f "$calib/manifest.json" ] || cli calibrate --model digits-dit --recipe q-dit --bits W4A8 --steps 50 --device "$device" --out "$calib"
[ -f "$work/export/manifest.json" ] || cli export --calib "$calib" --profile ort-dynamic --buckets 4 --out "$work/export"
[ -f "$work/engines/manifest.json" ] || cli build --export "$work/export" --out "$work/engines"
cli eval --engines "$work/engines" --ref "$calib" --n "$n" --steps 50 --seed 0 --device "$device" --out "$work/deployed-n$n.json"
