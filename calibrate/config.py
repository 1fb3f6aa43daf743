"""The one typed configuration of a calibration run; the CLI builds it, the artifact records it."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from dilatequant.core.errors import UserError

BIT_PRESETS = ("W8A8", "W6A6", "W4A8", "W4A4")
METHODS = ("dilatequant", "minmax")
ACT_INITS = ("minmax", "percentile", "mse")
WEIGHT_INITS = ("minmax", "mse")
TIMESTEP_SAMPLING = ("random", "uniform")
BOUNDARY = ("8bit", "fp")
SUPPORTED_BITS = (4, 6, 8)
DEFAULT_BKD_ITERS = 400  # per block; what docs/results/calibration.md was measured with


@dataclass(frozen=True)
class CalibConfig:
    """How to calibrate. `method='minmax'` initialises from min/max and skips distillation;
    `method='dilatequant'` initialises by MSE search and runs block-wise distillation (bkd_iters > 0)."""

    weight_bits: int = 8
    act_bits: int = 8
    method: str = "dilatequant"
    dilation: bool = True
    dilation_cap: float | None = 100.0
    tpq: bool = True
    act_symmetric: bool = True
    boundary: str = "8bit"
    quantize_attention: bool = False  # also the inputs of q·kᵀ and attn·v (softmax output included)
    weight_init: str = "minmax"
    act_init: str = "mse"
    percentile: float = 99.99
    # calibration data: FP trajectories, then `samples` (x_t, t) pairs drawn from them
    samples: int = 1024
    trajectories: int = 64
    timestep_sampling: str = "random"
    scheduler: str = "ddim"
    steps: int = 50
    seed: int = 0
    # block-wise knowledge distillation
    bkd_iters: int = 0
    bkd_batch: int = 32
    bkd_lr_weight: float = 1e-5
    bkd_lr_step: float = 1e-3  # relative to each step tensor's mean magnitude

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("method", self.method, METHODS), ("act_init", self.act_init, ACT_INITS),
            ("weight_init", self.weight_init, WEIGHT_INITS), ("boundary", self.boundary, BOUNDARY),
            ("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING),
        ):  # fmt: skip
            if value not in allowed:
                raise UserError(f"Calibration option {name}='{value}' is not one of: {', '.join(allowed)}.")
        for name, bits in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if bits not in SUPPORTED_BITS:
                raise UserError(f"{name}={bits} is unsupported; use one of {', '.join(map(str, SUPPORTED_BITS))}.")
        if self.samples < 1 or self.trajectories < 1 or self.steps < 1 or self.bkd_iters < 0:
            raise UserError("samples, trajectories and steps must be >= 1 and bkd_iters >= 0.")
        if self.samples > self.trajectories * self.steps:
            raise UserError(f"samples={self.samples} exceeds the {self.trajectories} trajectories x {self.steps} "
                            "steps recorded; raise trajectories or lower samples.")  # fmt: skip

    @classmethod
    def from_bits(cls, preset: str, **overrides) -> CalibConfig:
        """CalibConfig for 'W8A8', 'W4A8', ... plus overrides."""
        match = re.fullmatch(r"W(\d)A(\d)", preset.upper())
        if match is None:
            raise UserError(f"Bit preset '{preset}' is not of the form WxAy; use one of {', '.join(BIT_PRESETS)}.")
        return cls(weight_bits=int(match[1]), act_bits=int(match[2]), **overrides)

    @property
    def bits_name(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CalibConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
