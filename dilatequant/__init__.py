"""dilatequant: low-bit deployment of diffusion denoisers: calibrate -> export -> build -> load / profile.

    import dilatequant as dq
    dq.calibrate("digits", dq.CalibConfig.from_bits("W8A8"), "calib")           # calibrate/ (torch)
    dq.export("calib", dq.ExportConfig(buckets=4, profile="ort-cpu"), "onnx")   # export/ (onnx)
    dq.build("onnx", dq.BuildConfig(), "engines")                               # engines/ (a backend)
    variant = dq.load_variant("engines")                                        # a model, calibration or engines
    pipe.unet = dq.as_diffusers("engines")                                      # engines in a diffusers pipeline

The names resolve on first use, so `import dilatequant` imports no torch, onnx or runtime
(tests/test_architecture.py checks it). Each stage's package holds the rest; the CLI is `dilatequant.tools.cli`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
EXPORTS = {
    "calibrate": "dilatequant.calibrate.flow",
    "CalibConfig": "dilatequant.calibrate.config",
    "recipe": "dilatequant.calibrate.recipes",
    "export": "dilatequant.export.flow",
    "ExportConfig": "dilatequant.export.config",
    "build": "dilatequant.engines.engine",
    "load": "dilatequant.engines.engine",
    "as_diffusers": "dilatequant.engines.diffusers_adapter",
    "BuildConfig": "dilatequant.engines.config",
    "profile": "dilatequant.engines.profile",
    "ProfileConfig": "dilatequant.engines.profile",
    "load_variant": "dilatequant.tools.variants",
}
__all__ = sorted(EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ resolves the names
    from dilatequant.calibrate.config import CalibConfig  # noqa: F401
    from dilatequant.calibrate.flow import calibrate  # noqa: F401
    from dilatequant.calibrate.recipes import recipe  # noqa: F401
    from dilatequant.engines.config import BuildConfig  # noqa: F401
    from dilatequant.engines.diffusers_adapter import as_diffusers  # noqa: F401
    from dilatequant.engines.engine import build, load  # noqa: F401
    from dilatequant.engines.profile import ProfileConfig, profile  # noqa: F401
    from dilatequant.export.config import ExportConfig  # noqa: F401
    from dilatequant.export.flow import export  # noqa: F401
    from dilatequant.tools.variants import load_variant  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module 'dilatequant' has no attribute '{name}'")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(EXPORTS))
