"""Importing dilatequant stays light: no ONNX, ONNX Runtime or TensorRT until a feature needs them."""

import subprocess
import sys

MODULES = ["dilatequant.tools.cli", "dilatequant.calibrate.flow", "dilatequant.export.flow", "dilatequant.export.lint",
           "dilatequant.engines"]  # fmt: skip


def test_heavy_optional_packages_are_imported_lazily():
    code = (f"import sys; import {', '.join(MODULES)}; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'tensorrt', 'onnx_graphsurgeon', 'matplotlib') if m in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
