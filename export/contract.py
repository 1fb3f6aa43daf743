"""What export/ publishes to engines/: the export directory's layout and its verified manifest. Torch-free.

engines/ imports export only through this module (import-linter checks it, pyproject `[tool.importlinter]`), so an
engine process needs neither torch's calibration stack nor onnx's exporter:

    OUT/manifest.json             kind "export": profile, precision, bucket table, graphs, model spec and scheduler,
                                  calibrated timestep range, sha256 of every file
    OUT/bucket_<k>.onnx           graph k (inputs INPUT_NAMES, output OUTPUT_NAME), scales of bucket k
    OUT/weights.bin               the external data every bucket graph references
    OUT/check_inputs.safetensors  a few calibration inputs per bucket (x, t, labels)
"""

from __future__ import annotations

from pathlib import Path

from dilatequant.core.buckets import BucketTable
from dilatequant.core.manifest import read_manifest

KIND = "export"
FORMAT_VERSION = "1.0"
WEIGHTS_FILE = "weights.bin"
CHECK_INPUTS_FILE = "check_inputs.safetensors"
INPUT_NAMES = ("x", "t", "cond")  # cond only for conditional models
BATCH_DIM, TOKENS_DIM = "batch", "tokens"  # the graphs' free dimensions: every input's first; cond's second (encoder states)
OUTPUT_NAME = "eps"

__all__ = ["BATCH_DIM", "TOKENS_DIM", "CHECK_INPUTS_FILE", "FORMAT_VERSION", "INPUT_NAMES", "KIND", "OUTPUT_NAME", "WEIGHTS_FILE", "BucketTable",
           "read_export_manifest"]  # fmt: skip


def read_export_manifest(path: str | Path, verify: bool = True) -> dict:
    """The manifest of an export directory, its kind, format version and (with `verify`) every checksum checked."""
    return read_manifest(Path(path), KIND, FORMAT_VERSION, verify)
