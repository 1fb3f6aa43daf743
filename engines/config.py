"""The one typed configuration of an engine build."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dilatequant.core.errors import UserError
from dilatequant.core.manifest import recorded_config

from .backend import MODULES

BACKENDS = tuple(MODULES)
FIDELITY_MODES = ("fail", "warn", "off")
INTEGER_KERNELS = ("auto", "u8s8", "u8u8")


@dataclass(frozen=True)
class BuildConfig:
    """How to turn an export directory into engines.

    onnxruntime: `threads` intra-op threads per session (0: the cores divided among the streams); `streams`
    sessions per bucket that each run a slice of the batch concurrently (on the 2-core CPU, 2 streams x 1
    thread ran INT8 digits at 0.42x FP32 vs 0.50x for 1 x 2 threads: integer kernels scale poorly over
    threads); `provider` 'auto' (TensorRT, then CUDA, then CPU: the first the installed onnxruntime offers);
    `integer_kernels` 'auto' (u8u8 where this CPU's u8s8 kernels saturate, else u8s8), or forced; `prepack` lets
    ONNX Runtime repack the integer weights for its kernels, a copy per session beside the shared weights file
    (faster; off saves memory: 4 SD-1.5-size buckets 2.06 instead of 5.44 GB resident, 3.06 instead of 2.28 s per
    call, measured in docs/results/scale.md).
    torch: the reference executor (`provider` auto, cpu, cuda or cuda:N; one stream).
    tensorrt: an optimization profile over the batch dimension (`min_batch` <= `opt_batch` <= `max_batch`;
    resolution fixed to the model's, or free between `min_size` and `max_size` with `dynamic_resolution`; the encoder
    states' token count of a text-conditioned model between `min_tokens` and `max_tokens`, tuned for `opt_tokens`:
    CLIP pads to 77, T5 to 120 or 300, and SDXL's and PixArt's packed conditioning add a row),
    `optimization_level` 0-5 (TensorRT's builder optimization level), `refittable` and `strip_weights`
    (weight-stripped plans, refitted from the ONNX weights at load).
    Every build checks its engines against the graphs (engines/fidelity.py): `fidelity` 'fail' refuses to
    write engines with a layer whose relative error exceeds `fidelity_bound`, 'warn' writes and says so,
    'off' skips the check.
    """

    backend: str = "onnxruntime"
    threads: int = 0
    streams: int = 1
    provider: str = "auto"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    dynamic_resolution: bool = False
    min_size: int = 16
    max_size: int = 128
    min_tokens: int = 1
    opt_tokens: int = 77
    max_tokens: int = 512
    optimization_level: int = 3
    refittable: bool = False
    strip_weights: bool = False
    integer_kernels: str = "auto"
    prepack: bool = True
    fidelity: str = "fail"
    fidelity_bound: float = 1e-2

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"Unknown backend '{self.backend}'; choose one of {', '.join(BACKENDS)}.")
        if self.threads < 0:
            raise UserError(f"--threads must be >= 0 (0: one per core), got {self.threads}.")
        if self.streams < 1:
            raise UserError(f"--streams must be >= 1, got {self.streams}.")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UserError(f"Batch profile must satisfy 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}.")
        if not 1 <= self.min_tokens <= self.opt_tokens <= self.max_tokens:
            raise UserError(f"Token profile must satisfy 1 <= min <= opt <= max, got {self.min_tokens}/{self.opt_tokens}/{self.max_tokens}.")
        if not 0 <= self.optimization_level <= 5:
            raise UserError(f"--optimization-level must be 0..5 (TensorRT's builder levels), got {self.optimization_level}.")
        if self.dynamic_resolution and not 1 <= self.min_size <= self.max_size:
            raise UserError(f"Resolution range must satisfy 1 <= min <= max, got {self.min_size}..{self.max_size}.")
        if self.backend == "torch" and self.streams != 1:
            raise UserError("--streams is an onnxruntime option; the torch backend runs one stream.")
        if self.integer_kernels not in INTEGER_KERNELS:
            raise UserError(f"--integer-kernels must be one of {', '.join(INTEGER_KERNELS)}, got '{self.integer_kernels}'.")
        if self.integer_kernels != "auto" and self.backend != "onnxruntime":
            raise UserError("--integer-kernels is an onnxruntime option.")
        if self.fidelity not in FIDELITY_MODES:
            raise UserError(f"--fidelity must be one of {', '.join(FIDELITY_MODES)}, got '{self.fidelity}'.")
        if not self.fidelity_bound > 0:
            raise UserError(f"--fidelity-bound must be > 0 (a relative error, e.g. 1e-2), got {self.fidelity_bound}.")
        if not self.prepack and self.backend != "onnxruntime":
            raise UserError("--no-prepack is an onnxruntime option.")
        if self.strip_weights and self.backend != "tensorrt":
            raise UserError("--strip-weights is a TensorRT option; the onnxruntime backend keeps its weights.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, format_version: str = "1.0") -> BuildConfig:
        """A recorded config (unknown keys are an error); engine directories written before the fidelity gate
        have no fidelity fields."""
        return recorded_config(cls, values, "build", format_version)
