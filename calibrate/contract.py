"""What calibrate/ publishes to the next stage: the calibration artifact and the functions that read it.

export/ imports calibrate only through this module (import-linter checks it, pyproject `[tool.importlinter]`):

    load_artifact(path) -> CalibrationArtifact   verified manifest, records, typed accessors: quantized_layers(),
                                                 groups(), weight_step(layer), weight_zero_point(layer),
                                                 act_table(group), dilation(group),
                                                 act_steps(), calibration_data(), model (the fake-quant model)
    bucket_scales(artifact, table, ...)          per-bucket activation tables for a BucketTable (calibrate/rebucket.py)
    bucketed_model(artifact, table, ...)         the fake-quant model with those rows (to compare graphs against)
    describe(path)                               the `inspect` summary
"""

from .artifact import FORMAT_VERSION, KIND, CalibrationArtifact, describe, load_artifact
from .calib_data import CalibrationData
from .quant_model import OUTPUT_SUFFIX
from .rebucket import BucketScales, GroupTable, bucket_scales, bucketed_model

__all__ = ["FORMAT_VERSION", "KIND", "OUTPUT_SUFFIX", "BucketScales", "CalibrationArtifact", "CalibrationData",
           "GroupTable", "bucket_scales", "bucketed_model", "describe", "load_artifact"]  # fmt: skip
