"""RepQuant's softmax quantizer: log√2 codes for calibration, and their exact rewrite into log2 codes and one √2.

Attention probabilities A ∈ [0, 1] are mostly tiny with a few large values, which a uniform grid wastes its levels
on. The log√2 quantizer puts its levels at Δ·2^(−q/2): code q = clamp(round(−2·log2(A / Δ)), 0, 2^b − 1), and a value
below the smallest level (q ≥ 2^b before the clamp, or A = 0) dequantizes to 0 (RepQ-ViT's code does the same).
At inference every level is a power of two times 1 or √2: q = 2k is 2^(−k), q = 2k − 1 is √2·2^(−k). So A·V is two
shift-only products, Δ·(Σ_even 2^(−k)·V + √2·Σ_odd 2^(−k)·V): log2 hardware plus one constant multiply
(algorithms.md §3.2).
"""

from __future__ import annotations

import math

import torch
from torch import nn

SQRT2 = math.sqrt(2)


def log_sqrt2_codes(a: torch.Tensor, bits: int, delta: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of `a` (probabilities, ≤ delta) and the mask of values that dequantize to 0."""
    levels = 2**bits
    raw = torch.round(-2 * torch.log2(a / delta))  # inf where a == 0
    return raw.clamp(0, levels - 1), raw >= levels


def log_sqrt2_dequantize(codes: torch.Tensor, zero: torch.Tensor, delta: float | torch.Tensor = 1.0) -> torch.Tensor:
    return torch.where(zero, torch.zeros_like(codes), delta * torch.exp2(-codes / 2))


def log_sqrt2_quantize(a: torch.Tensor, bits: int, delta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Fake-quantized probabilities (the calibration-time quantizer)."""
    return log_sqrt2_dequantize(*log_sqrt2_codes(a, bits, delta), delta)


def log2_shifts(codes: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewrite: the shift-only multipliers 2^(−ceil(q / 2)) of the even codes and of the odd codes (0 elsewhere)."""
    shift = torch.where(zero, torch.zeros_like(codes), torch.exp2(-torch.ceil(codes / 2)))
    odd = (codes % 2 == 1) & ~zero
    return torch.where(odd | zero, torch.zeros_like(shift), shift), torch.where(odd, shift, torch.zeros_like(shift))


def log2_matmul(codes: torch.Tensor, zero: torch.Tensor, v: torch.Tensor, delta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """A·V from log√2 codes with two shift-only products and one √2: Δ·(even @ V + √2·(odd @ V))."""
    even, odd = log2_shifts(codes, zero)
    return delta * (even @ v + SQRT2 * (odd @ v))


class LogSqrt2Quantizer(nn.Module):
    """The softmax-output quantizer of a quantized attention (`softmax_quantizer='log-sqrt2'`): Δ = 1, since
    probabilities are at most 1, so it has nothing to calibrate. Gradients pass straight through (distillation)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits, self.enabled = bits, False

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return probs
        return probs + (log_sqrt2_quantize(probs.detach().double(), self.bits).to(probs.dtype) - probs).detach()
