"""Uniform fake quantization with straight-through rounding and learnable steps (LSQ-style).

`q = clamp(round(x / Δ) + z, qmin, qmax)`, `x̂ = Δ (q − z)`. Gradients pass through `round` unchanged
(straight-through estimator), so Δ is trained by ordinary autograd.

Weights: per output channel, symmetric (z = 0) — the only form TensorRT accepts.
Activations: per tensor, one (Δ, z) row per calibrated timestep (Temporal Parallel Quantizer): every
sample of a mixed-timestep batch gathers its own row, so one forward/backward pass trains all timesteps.
Attention matmul inputs ([batch, heads, ...]) can have one column per head as well: a (timestep × head) table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .timesteps import TimestepIndex

MIN_STEP = 1e-8


@dataclass(frozen=True)
class IntFormat:
    """Integer grid: symmetric signed ([-2^(b-1), 2^(b-1)-1], z = 0) or asymmetric unsigned ([0, 2^b - 1])."""

    bits: int
    symmetric: bool = True

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward."""
    return x + (x.round() - x).detach()


def fake_quantize(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | float, fmt: IntFormat) -> torch.Tensor:
    """Quantize-dequantize `x` (step and zero point broadcast against x); differentiable in x and step."""
    step = step.clamp_min(MIN_STEP)
    q = torch.clamp(round_ste(x / step) + zero_point, fmt.qmin, fmt.qmax)
    return (q - zero_point) * step


def symmetric_step(amax: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    return (amax / fmt.qmax).clamp_min(MIN_STEP)


def asymmetric_step_and_zero(lo: torch.Tensor, hi: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and (integer-valued) zero point whose grid spans [min(lo, 0), max(hi, 0)]."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    step = ((hi - lo) / (fmt.qmax - fmt.qmin)).clamp_min(MIN_STEP)
    return step, (fmt.qmin - lo / step).round().clamp(fmt.qmin, fmt.qmax)


def grid(lo: torch.Tensor, hi: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point of `fmt`'s grid over [lo, hi]: symmetric over max(|lo|, |hi|) (zero point 0), or asymmetric."""
    if fmt.symmetric:
        step = symmetric_step(torch.maximum(-lo, hi), fmt)
        return step, torch.zeros_like(step)
    return asymmetric_step_and_zero(lo, hi, fmt)


def mse_shrink(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Per slice of x's last dimension (lo and hi: one value per slice), the factor in [0.3, 1] on its range whose
    grid has the least squared error."""
    best, best_err = torch.ones_like(lo), torch.full_like(lo, float("inf"))
    for factor in torch.linspace(0.3, 1.0, 36).tolist():
        step, zero = grid(lo * factor, hi * factor, fmt)
        err = (fake_quantize(x, step.unsqueeze(-1), zero.unsqueeze(-1), fmt) - x).pow(2).mean(-1)
        better = err < best_err
        best, best_err = torch.where(better, torch.full_like(best, factor), best), torch.where(better, err, best_err)
    return best


def mse_search_amax(x: torch.Tensor, amax: torch.Tensor, fmt: IntFormat, dim: int | None = None) -> torch.Tensor:
    """Symmetric clipping range in [0.3, 1] x amax minimising the quantization MSE (per slice of `dim` 0, or overall)."""
    flat, bound = (x.flatten(1), amax) if dim == 0 else (x.reshape(1, -1), amax.reshape(1))
    return amax * mse_shrink(flat, -bound, bound, fmt).view_as(amax)


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric fake quantizer with a learnable step per channel."""

    def __init__(self, weight: torch.Tensor, bits: int, init: str = "minmax") -> None:
        super().__init__()
        self.fmt = IntFormat(bits, symmetric=True)
        amax = weight.detach().abs().flatten(1).amax(1)
        if init == "mse":
            amax = mse_search_amax(weight.detach(), amax, self.fmt, dim=0)
        self.step = nn.Parameter(symmetric_step(amax, self.fmt))
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return fake_quantize(weight, self.step.view(-1, *[1] * (weight.dim() - 1)), 0.0, self.fmt)


class ActQuantizer(nn.Module):
    """Per-tensor activation fake quantizer with one (step, zero point) row per timestep (TPQ).

    `dilation` (one factor s_k >= 1 per input channel) records the weight dilation of the layers fed by
    this input. When it could not be folded into a predecessor, `prescale` is true and the input is
    multiplied by 1/s here, before quantization (exported as a constant Mul before QuantizeLinear).
    Until `enabled` is set (after initialisation) the quantizer passes its (pre-scaled) input through.
    """

    def __init__(self, index: TimestepIndex, rows: int, bits: int, symmetric: bool, channel_dim: int, heads: int = 1) -> None:
        super().__init__()
        self.index, self.fmt, self.channel_dim, self.heads = index, IntFormat(bits, symmetric), channel_dim, heads
        shape = (rows, heads) if heads > 1 else (rows,)  # heads: inputs shaped [batch, heads, ...]
        self.step = nn.Parameter(torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("dilation", torch.ones(0))
        self.prescale = False
        self.enabled = False

    def set_dilation(self, factors: torch.Tensor, prescale: bool) -> None:
        self.dilation, self.prescale = factors.detach().clone(), prescale

    def channel_view(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return values.view(shape)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The table row of every sample of x: its timestep's, or row 0 of a one-row (shared) table."""
        if len(self.step) > 1:
            return self.index.rows_for(len(x)).to(x.device)
        return torch.zeros(len(x), dtype=torch.long, device=x.device)

    def per_sample(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """This batch's row of `table` for every sample (and head), shaped to broadcast against x."""
        return table[self.rows(x)].view(len(x), *table.shape[1:], *[1] * (x.dim() - table.dim()))

    def prescaled(self, x: torch.Tensor) -> torch.Tensor:
        """x as the grid sees it: multiplied by 1/s when the dilation is a pre-scale (the exported constant Mul)."""
        return x * self.channel_view(x, self.dilation.reciprocal()) if self.prescale else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prescaled(x)
        if not self.enabled:
            return x
        return fake_quantize(x, self.per_sample(x, self.step), self.per_sample(x, self.zero_point), self.fmt)
