"""The one way to import an optional dependency: on first use, with an error naming the feature and the extra.

Stages import onnx, onnxruntime, TensorRT, matplotlib or ModelOpt through `require` inside the functions that
need them, so `import dilatequant` and each stage import without them (tests/test_architecture.py checks it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError


def require(module: str, feature: str, extra: str) -> ModuleType:
    """`importlib.import_module(module)`, or MissingDependencyError: '`feature` needs the package …,
    install dilatequant[`extra`]' naming the top-level package that failed to import."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(feature, (exc.name or module).split(".")[0], extra) from exc
