#!/usr/bin/env bash
# Install into /tmp/site the carried dependency wheels (.whl/: diffusers, huggingface_hub, click, hf-xet,
# onnx-graphsurgeon; the machine has torch, onnx, onnxruntime) and dilatequant from this checkout, which travels
# anyway (a dilatequant wheel would carry the bundled models twice, past the 64 MiB a call may send).
# Scripts running side by side call this: the first installs, the others wait on the lock and reuse the install
# while the wheels and the sources are the same.
set -uo pipefail
(
  flock 9
  { sha256sum .whl/*.whl; find . -path ./.device-work -prune -o \( -name '*.py' -o -name pyproject.toml \) -print |
    sort | xargs sha256sum; } > /tmp/install.sha256
  cmp -s /tmp/install.sha256 /tmp/site/.install.sha256 && exit
  rm -rf /tmp/site &&
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site . &&
    cp /tmp/install.sha256 /tmp/site/.install.sha256
) 9> /tmp/site.lock
