#!/usr/bin/env bash
# Install the carried wheels (.whl/) into /tmp/site once per machine: scripts running side by side call this, the
# first installs, the others wait on the lock and reuse the install while the wheels are the same.
set -uo pipefail
(
  flock 9
  sha256sum .whl/*.whl > /tmp/wheels.sha256
  cmp -s /tmp/wheels.sha256 /tmp/site/.wheels.sha256 && exit
  rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    cp /tmp/wheels.sha256 /tmp/site/.wheels.sha256
) 9> /tmp/site.lock
