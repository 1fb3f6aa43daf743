"""The one typed configuration of an export."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dilatequant.core.errors import UserError
from dilatequant.core.manifest import recorded_config

from .profiles import PROFILES, ExportProfile, get_profile

SCALE_SOURCES = ("calibrated", "rederived")


@dataclass(frozen=True)
class ExportConfig:
    """`buckets`: a count, or 'auto' (fewest buckets whose estimated error is within `auto_tolerance` of
    per-timestep scales). `profile`: a name in export/profiles.py ('tensorrt': one shared Q/DQ per input; 'ort-cpu':
    one per consumer). `fp32`: keep the unquantized parts in FP32 where the profile allows FP16; `precision` says
    what is written.
    `scales`: 'calibrated' deploys the calibrated (learned) activation rows, 'rederived' re-initialises every
    bucket from its calibration samples (export/buckets.py `bucketed_model`)."""

    buckets: int | str = 4
    profile: str = "tensorrt"
    fp32: bool = False
    opset: int = 19
    auto_tolerance: float = 0.1
    scales: str = "calibrated"

    def __post_init__(self) -> None:
        get_profile(self.profile)
        if self.scales not in SCALE_SOURCES:
            raise UserError(f"Unknown --scales '{self.scales}'; choose one of {', '.join(SCALE_SOURCES)}.")
        if self.buckets != "auto" and not (isinstance(self.buckets, int) and self.buckets >= 1):
            raise UserError(f"--buckets takes a positive count or 'auto', got {self.buckets!r}.")

    @property
    def target(self) -> ExportProfile:
        return PROFILES[self.profile]

    @property
    def precision(self) -> str:
        """'fp32' or 'fp16': the precision of the unquantized parts that is written."""
        return self.target.float_precision or ("fp32" if self.fp32 else "fp16")

    def to_dict(self) -> dict:
        """The config as recorded; `fp32` says what was written (True for a profile that forces FP32)."""
        return {**asdict(self), "fp32": self.precision == "fp32"}

    @classmethod
    def from_dict(cls, values: dict, format_version: str = "1.0") -> ExportConfig:
        return recorded_config(cls, values, "export", format_version)
