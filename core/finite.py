"""Non-finite values are errors: a NaN or Inf in weights, calibration data, quantizer ranges, learned parameters or
exported initializers stops the run with a message naming the tensor, instead of spreading silently downstream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError


@dataclass(frozen=True)
class NonFinite:
    name: str
    nan: int
    inf: int
    total: int

    def __str__(self) -> str:
        return f"'{self.name}' ({self.nan} NaN and {self.inf} Inf of {self.total} values)"


def nonfinite(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> list[NonFinite]:
    """Every floating-point tensor of `tensors` that holds a NaN or an Inf, in order."""
    found = []
    for name, value in tensors.items():
        lib = np if isinstance(value, np.ndarray) else torch
        if not (np.issubdtype(value.dtype, np.floating) if lib is np else torch.is_floating_point(value)):
            continue
        finite = lib.isfinite(value)
        if not bool(finite.all()):
            nan = int(lib.isnan(value).sum())
            found.append(NonFinite(name, nan, int((~finite).sum()) - nan, int(value.size if lib is np else value.numel())))
    return found


def require_finite(tensors: Mapping[str, torch.Tensor | np.ndarray], what: str, fix: str) -> None:
    """Raise a UserError naming the first non-finite tensor of `what` (and how many more there are), then `fix`."""
    found = nonfinite(tensors)
    if found:
        more = f" and {len(found) - 1} more tensor(s)" if len(found) > 1 else ""
        raise UserError(f"{what} holds non-finite values: {found[0]}{more}. {fix}")
