"""Q-DiT's quantizer formats: group-wise weights along input channels, dynamic per-token-group activations.

For `y = x Wᵀ` with `W` of shape [out, in], both `W` (each output row) and `x` (each token) are split along the
input dimension into groups of `group_size` channels, and every group gets its own grid, so an outlier channel
only coarsens the grid of its own group. Weights have calibrated grids (min/max or MSE-searched ranges);
activations have *dynamic* grids, computed from each token's group at run time as ONNX's DynamicQuantizeLinear
does for a whole tensor (uint8, the range widened to include 0, round half to even) — nothing per timestep is
stored. Formats are listed in FORMATS, the group-size choices of a layer by `legal_group_sizes`.
"""

from __future__ import annotations

import torch
from torch import nn

from dilatequant.core.errors import UserError

from .quantizer import IntFormat, fake_quantize, grid, mse_shrink


def check_group_size(width: int, group_size: int, layer: str = "this layer") -> None:
    """Refuse a group size that does not split `width` input channels into whole groups."""
    if group_size < 1 or width % group_size:
        raise UserError(f"group size {group_size} does not divide the {width} input channels of {layer}; "
                        f"choose one of {legal_group_sizes(width, range(1, width + 1))[-6:]} or another divisor.")  # fmt: skip


def legal_group_sizes(width: int, choices) -> list[int]:
    """The choices that divide `width` (the genes a search may give this layer)."""
    return [g for g in choices if g >= 1 and width % g == 0]


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [..., in] as [..., in / group_size, group_size]."""
    return x.unflatten(-1, (x.shape[-1] // group_size, group_size))


class GroupWeightQuantizer(nn.Module):
    """Fake quantizer of a Linear weight [out, in] with one learnable step (and zero point) per (row, group)."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, init: str = "minmax",
                 layer: str = "this layer") -> None:  # fmt: skip
        super().__init__()
        if weight.dim() != 2:
            raise UserError(f"group-wise weights are for Linear layers ([out, in]); {layer} has a {weight.dim()}-d weight.")
        check_group_size(weight.shape[1], group_size, layer)
        self.fmt, self.group_size = IntFormat(bits, symmetric), group_size
        groups = grouped(weight.detach(), group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
        if init == "mse":
            shrink = mse_shrink(groups, lo, hi, self.fmt)
            lo, hi = lo * shrink, hi * shrink
        step, zero = grid(lo, hi, self.fmt)
        self.step = nn.Parameter(step)
        self.register_buffer("zero_point", zero)
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        groups = fake_quantize(grouped(weight, self.group_size), self.step.unsqueeze(-1), self.zero_point.unsqueeze(-1), self.fmt)
        return groups.flatten(-2)


def dynamic_step_and_zero(x: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid over the last dimension computed from the values at hand. Asymmetric, it is DynamicQuantizeLinear's
    (the range [min(x, 0), max(x, 0)] on uint8); symmetric, max|x| / qmax with zero point 0 (the int8 blocks of
    MatMulNBits' `accuracy_level=4`)."""
    return grid(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), fmt)


class DynamicActQuantizer(nn.Module):
    """Fake quantizer of activations [..., in] with a grid per token and group, computed from the values at hand.

    `group_size=None` takes the whole last dimension (per-token); `per_tensor=True` takes the whole tensor, which is
    exactly ONNX's DynamicQuantizeLinear (what `DynamicQuantizeLinear` + `MatMulInteger` deploy). Asymmetric uint8
    by default (Q-DiT's); `symmetric=True` gives int8 with zero point 0.
    """

    def __init__(self, bits: int = 8, group_size: int | None = None, per_tensor: bool = False, symmetric: bool = False) -> None:
        super().__init__()
        if per_tensor and group_size is not None:
            raise UserError("a per-tensor dynamic quantizer has no groups: give group_size or per_tensor, not both.")
        self.fmt, self.group_size, self.per_tensor = IntFormat(bits, symmetric), group_size, per_tensor
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.per_tensor:
            view = x.reshape(1, -1)
        else:
            check_group_size(x.shape[-1], self.group_size or x.shape[-1], "this activation")
            view = grouped(x, self.group_size or x.shape[-1])
        step, zero = dynamic_step_and_zero(view.detach(), self.fmt)  # the grid is data, not a trained parameter
        return fake_quantize(view, step, zero, self.fmt).reshape(x.shape)
