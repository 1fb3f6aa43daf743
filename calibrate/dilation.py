"""Weight Dilation: weights-only equivalent scaling that shrinks activations, moving no weight range.

`Y = (X / s) · (diag(s) W)` with one factor per input channel k, chosen from the weights alone:
an input channel holding some output channel's extreme weight is saturated (s_k = 1); any other is
multiplied by the largest factor that keeps each of its weights inside every output channel's range,
`s_k = min_j a_j / |W_jk|` with `a_j = max_k |W_jk|`. So s_k >= 1, every per-output-channel weight range
(hence the weight step) is unchanged, and activation channel k shrinks by s_k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def column_maxima(weight: torch.Tensor) -> torch.Tensor:
    """|W| maximised over kernel positions: shape (out, in) for Linear and Conv weights alike."""
    magnitude = weight.detach().abs()
    return magnitude.flatten(2).amax(2) if magnitude.dim() > 2 else magnitude


def dilation_factors(weights: list[torch.Tensor], cap: float | None = None) -> torch.Tensor:
    """One factor per input channel for layers reading the same input (their output channels stacked).

    All-zero input columns get s = 1 (nothing to dilate); `cap` bounds the factors of near-zero columns.
    """
    m = torch.cat([column_maxima(w) for w in weights]).double()  # (sum of out, in)
    a = m.amax(1, keepdim=True)
    ratio = torch.where(m > 0, a / m, torch.full_like(m, float("inf")))
    s = ratio.amin(0)
    s = torch.where(torch.isinf(s), torch.ones_like(s), s)
    if cap is not None:
        s = s.clamp(max=cap)
    return s.clamp(min=1.0).to(weights[0].dtype)


def input_channel_view(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return s.view(1, -1, *[1] * (weight.dim() - 2))


@dataclass
class DilationRecord:
    """What dilation did to one input group (kept in the artifact and reported)."""

    group: str
    factors: torch.Tensor
    folded_into: str | None  # predecessor name, or None: pre-scale in the activation quantizer

    def stats(self) -> dict:
        s = self.factors.double().cpu()
        return {
            "channels": len(s),
            "unsaturated": int((s > 1.0 + 1e-6).sum()),
            "factor_median": float(s.median()),
            "factor_max": float(s.max()),
            "folded_into": self.folded_into,
        }


def dilate_group(
    layers: list[nn.Conv2d | nn.Linear], cap: float | None, fold: Callable[[torch.Tensor], None] | None
) -> torch.Tensor:
    """Scale the layers' input columns by s and, where given, divide the predecessor's output by s."""
    if any(isinstance(layer, nn.Conv2d) and layer.groups != 1 for layer in layers):
        return torch.ones(layers[0].weight.shape[1])  # grouped conv: channels are not shared, skip
    s = dilation_factors([layer.weight for layer in layers], cap)
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(input_channel_view(layer.weight, s))
        if fold is not None:
            fold(s)
    return s


def summarise(records: list[DilationRecord]) -> dict:
    """Model-wide dilation statistics: share of unsaturated channels, factor distribution, fold counts."""
    factors = torch.cat([r.factors.double().cpu() for r in records]) if records else torch.ones(1, dtype=torch.float64)
    quantiles = torch.quantile(factors, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {
        "groups": len(records),
        "folded_groups": sum(r.folded_into is not None for r in records),
        "channels": len(factors),
        "unsaturated_share": float((factors > 1.0 + 1e-6).double().mean()),
        "factor_median": quantiles[0],
        "factor_p90": quantiles[1],
        "factor_p99": quantiles[2],
        "factor_max": float(factors.max()),
    }
