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
from typing import TYPE_CHECKING, Protocol

import numpy as np

from dilatequant.core.errors import UserError

if TYPE_CHECKING:
    from .config import BuildConfig

# The backends registry: name -> the module whose BACKEND implements it (imported on first use).
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


class BucketEngine:
    """One bucket's engine with a runner's lifecycle (Polygraphy's activate / infer / deactivate): `load` only
    says where it is; `activate` creates what runs it (sessions and their thread pool, an execution context,
    a graph on a device), `infer` runs a batch, `close` releases all of it. Also a context manager.
    Subclasses implement `_activate` (which sets `input_dtypes`: graph inputs x, t, cond -> numpy dtype),
    `_infer` and `_close`."""

    input_dtypes: dict[str, np.dtype]
    active: bool = False

    def __init__(self, name: str) -> None:
        self.name = name

    def activate(self) -> BucketEngine:
        if not self.active:
            self._activate()
            self.active = True
        return self

    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if not self.active:
            raise UserError(f"Engine {self.name} is not active (closed, or never activated); call activate() first.")
        return self._infer(feeds)

    def close(self) -> None:
        if self.active:
            self._close()
            self.active = False

    def __enter__(self) -> BucketEngine:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.close()

    def _activate(self) -> None:
        raise NotImplementedError

    def _infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


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
        """The (not yet active) engine of one bucket of a verified engine directory; checks that it can run here."""


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
    if name not in MODULES:
        raise UserError(f"Unknown engine backend '{name}'; backends: {', '.join(MODULES)}.")
    return importlib.import_module(MODULES[name]).BACKEND
