#!/usr/bin/env bash
# ONNX Runtime CPU latency of `digits` with quantized attention vs without vs FP32, batch 1 and 8, side by side in one
# `profile` run (docs/results/repquant.md, "Latency"): the demo's settings (demo-quick W8A8, ort-cpu, 4 buckets), the
# one difference being --quantize-attention; engines with two streams, as the demo builds them. Each finished stage in WORK is kept and skipped on a rerun.
#   WORK=/tmp/attn-latency bash tools/attention_latency.sh          (2-core CPU: about 4 min)
set -euo pipefail
work=${WORK:?set WORK to a working directory} runs=${RUNS:-30}
dq() { dilatequant "$@"; }
for variant in int8 int8-attention; do
  flag=$([ "$variant" = int8-attention ] && echo --quantize-attention || true)
  [ -f "$work/$variant-calib/manifest.json" ] || dq calibrate --model digits --recipe demo-quick --bits W8A8 $flag --out "$work/$variant-calib"
  [ -f "$work/$variant-export/manifest.json" ] || dq export --calib "$work/$variant-calib" --profile ort-cpu --buckets 4 --out "$work/$variant-export"
  [ -f "$work/$variant-engines/manifest.json" ] || dq build --export "$work/$variant-export" --streams 2 --out "$work/$variant-engines"
done
[ -f "$work/fp32-export/manifest.json" ] || dq export --model digits --precision fp32 --out "$work/fp32-export"
[ -f "$work/fp32-engines/manifest.json" ] || dq build --export "$work/fp32-export" --streams 2 --out "$work/fp32-engines"
dq lint "$work/int8-attention-export/bucket_0.onnx" --profile ort-cpu --min-fused 0 > "$work/int8-attention-lint.txt" || true
dq profile --engines "$work/int8-attention-engines" --compare "$work/fp32-engines" --compare "$work/int8-engines" \
  --batch 1,8 --runs "$runs" --out "$work/profile.json" --chart "$work/profile.png"
