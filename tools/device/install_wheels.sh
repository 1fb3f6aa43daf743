#!/usr/bin/env bash
# Install into /tmp/site the carried dependency wheels (.whl/: diffusers, huggingface_hub, click, hf-xet,
# onnx-graphsurgeon; the machine has torch, onnx, onnxruntime), and link dilatequant to this checkout's package
# root (dilatequant/, whose subfolders link to the stage folders): the checkout travels anyway, and a dilatequant
# wheel would carry the bundled models twice, past the 64 MiB a call may send.
# Scripts running side by side call this: the first installs, the others wait on the lock and reuse the install
# while the wheels are the same.
set -uo pipefail
(
  flock 9
  sha256sum .whl/*.whl > /tmp/wheels.sha256
  if ! cmp -s /tmp/wheels.sha256 /tmp/site/.wheels.sha256; then
    rm -rf /tmp/site &&
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
      cp /tmp/wheels.sha256 /tmp/site/.wheels.sha256 || exit
  fi
  ln -sfn "$PWD/dilatequant" /tmp/site/dilatequant
) 9> /tmp/site.lock
