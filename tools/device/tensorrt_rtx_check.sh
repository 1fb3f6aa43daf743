#!/usr/bin/env bash
# NVIDIA's ONNX parser and builder on our tensorrt-profile graphs, via TensorRT-RTX (device tool). The 95 MB
# tensorrt_rtx_cu13_libs wheel exceeds one call's carry, so it travels in parts over consecutive calls on the
# warm machine:
#   here:   split -b 30M tensorrt_rtx_cu13_libs-*.whl .rtx/part-   (one part per directory .rtx/p1, .rtx/p2, ...)
#   device: bash tools/device/tensorrt_rtx_check.sh stage .rtx/p1       (carry .rtx/p1; repeat per part)
#   device: bash tools/device/tensorrt_rtx_check.sh check EXPORT_DIR ... (carry .rtx/run: bindings wheel, the
#           tensorrt_rtx package dir, exports; and .whl)  -> $OUT/tensorrt_rtx.json
set -euo pipefail
if [ "$1" = stage ]; then
  mkdir -p /root/rtx-parts && cp "$2"/part-* /root/rtx-parts/ && ls -la /root/rtx-parts && exit 0
fi
shift
rm -rf /tmp/rtxsite /tmp/site && mkdir -p /tmp/rtxsite
cat /root/rtx-parts/part-* > /tmp/rtx_libs.whl
python3 -m zipfile -e /tmp/rtx_libs.whl /tmp/rtxsite
python3 -m zipfile -e .rtx/run/tensorrt_rtx_cu13_bindings-*.whl /tmp/rtxsite
cp -r .rtx/run/tensorrt_rtx /tmp/rtxsite/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
cudart=$(dirname "$(find / -name 'libcudart.so.13*' 2>/dev/null | head -1)")
export PYTHONPATH=/tmp/rtxsite:/tmp/site LD_LIBRARY_PATH="/tmp/rtxsite/tensorrt_rtx_libs:$cudart:${LD_LIBRARY_PATH:-}"
python3 tools/device/tensorrt_rtx_check.py "$OUT/tensorrt_rtx.json" "$@"
