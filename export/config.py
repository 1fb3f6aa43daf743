"""The one typed configuration of an export."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dilatequant.core.errors import UserError

PROFILES = ("tensorrt", "ort-cpu")
SCALE_SOURCES = ("calibrated", "rederived")


@dataclass(frozen=True)
class ExportConfig:
    """`buckets`: a count, or 'auto' (fewest buckets whose estimated error is within `auto_tolerance` of
    per-timestep scales). `profile`: 'tensorrt' (one shared Q/DQ per input) or 'ort-cpu' (one per consumer).
    `scales`: 'calibrated' deploys the calibrated (learned) activation rows, 'rederived' re-initialises every
    bucket from its calibration samples (export/buckets.py `bucketed_model`)."""

    buckets: int | str = 4
    profile: str = "tensorrt"
    fp32: bool = False
    opset: int = 19
    auto_tolerance: float = 0.1
    scales: str = "calibrated"

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise UserError(f"Unknown profile '{self.profile}'; choose one of {', '.join(PROFILES)}.")
        if self.scales not in SCALE_SOURCES:
            raise UserError(f"Unknown --scales '{self.scales}'; choose one of {', '.join(SCALE_SOURCES)}.")
        if self.buckets != "auto" and not (isinstance(self.buckets, int) and self.buckets >= 1):
            raise UserError(f"--buckets takes a positive count or 'auto', got {self.buckets!r}.")
        if self.profile == "ort-cpu" and not self.fp32:
            object.__setattr__(self, "fp32", True)  # ONNX Runtime's CPU kernels are FP32: no FP16 variant

    def to_dict(self) -> dict:
        return asdict(self)
