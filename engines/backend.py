"""What an engine backend provides, and the lazy lookup of backends by name.

A backend builds one engine per bucket graph of an export directory and loads them back. Backends import
their runtime (onnxruntime, tensorrt/polygraphy) only when used, so `import dilatequant.engines` works
without either installed; a missing one raises MissingDependencyError naming the extra to install.
"""

from __future__ import annotations

import functools
import importlib
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .config import BuildConfig

MODULES = {
    "onnxruntime": "dilatequant.engines.onnxruntime_backend",
    "tensorrt": "dilatequant.engines.tensorrt_backend",
    "torch": "dilatequant.engines.torch_backend",
}


@dataclass(frozen=True)
class BuildContext:
    """What every bucket build of one export shares: the export directory and its manifest, the engine
    staging directory (files written there end up in the engine directory) and the build configuration."""

    export_dir: Path
    export_manifest: dict
    staging: Path
    config: BuildConfig


class BucketEngine(Protocol):
    """One loaded bucket engine: graph inputs by name (x, t, cond) with their numpy dtypes, and a run."""

    input_dtypes: dict[str, np.dtype]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


class Backend(Protocol):
    name: str

    def version(self) -> str:
        """The installed runtime's version, recorded in the manifest and checked at load."""

    def device(self, config: BuildConfig) -> str:
        """The device the engines run on (e.g. 'cpu (AMD Ryzen ..., avx512_vnni)' or a GPU name)."""

    def build(self, context: BuildContext) -> dict:
        """Build every bucket graph of the export into `context.staging`; returns the manifest fields of the
        backend: {"engines": {bucket_key: file}, ...anything else worth recording (providers, timing cache)}."""

    def load(self, engine_dir: Path, manifest: dict, bucket: str) -> BucketEngine:
        """Load the engine of one bucket of a verified engine directory."""


@functools.cache
def cpu_name() -> str:
    """CPU model and the instruction-set extensions CPU kernels choose between (the device of CPU engines)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    extensions = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"cpu ({model}; {' '.join(extensions) or 'no avx2'})"


def get_backend(name: str) -> Backend:
    """The backend called `name`, imported on first use."""
    return importlib.import_module(MODULES[name]).BACKEND
