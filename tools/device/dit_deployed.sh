#!/usr/bin/env bash
# A job of tools/device/issue14_dit_rows.jobs: the deployed Q-DiT W4A8 graphs (ort-dynamic: MatMulNBits with
# dynamic int8 inputs) on ONNX Runtime CPU against their fake-quantized model, from the same noise, at n = N
# (default 1000). Waits for the row job that calibrates the artifact, then exports, builds and evaluates.
set -euo pipefail
n=${N:-1000}
calib=$WORK/digits-dit-seed0/W4A8-q-dit-groups-of-128---dynamic-activations
dest=$WORK/dit-deployed
until [ -f "$calib/manifest.json" ]; do sleep 15; done
mkdir -p "$dest"
cli() { python3 -m dilatequant.tools.cli "$@"; }
[ -f "$dest/export/manifest.json" ] || cli export --calib "$calib" --profile ort-dynamic --buckets 4 --out "$dest/export"
[ -f "$dest/engines/manifest.json" ] || cli build --export "$dest/export" --out "$dest/engines"
cli eval --engines "$dest/engines" --ref "$calib" --n "$n" --steps 50 --seed 0 --device cuda --out "$dest/deployed-n$n.json"
