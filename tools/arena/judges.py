"""Metric judges: automatic voters that rank a match's images by a metric, to pre-fill an arena or run it with no
humans, and to measure how far the metrics agree with human eyes (Spearman's ρ on the leaderboard page).

A judge scores exactly the PNGs voters see (8-bit), higher is better; equal scores are ties.
- `psnr`: paired PSNR to the reference variant's image of the same item (same condition, same initial noise);
  the reference's own image scores PSNR_CAP.
- `classifier`: the bundled digits classifier's probability of the requested class (1x32x32 class-conditional
  models only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dilatequant.core.errors import UserError
from dilatequant.core.metrics import DigitsMetrics, digits_metrics

from .gallery import Gallery, Item

PSNR_CAP = 100.0  # dB for identical images (an infinite PSNR would not sort with ties)


def places_from_scores(scores: Sequence[float]) -> list[int]:
    """Places (0 = best) of scores, higher better; equal scores share a place."""
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(score) for score in scores]


@dataclass(frozen=True)
class PsnrJudge:
    gallery: Gallery
    reference: str

    def scores(self, shown: Sequence[str], item: Item) -> list[float]:
        ref = self.gallery.pixels(self.reference, item.index).astype(np.float64)
        out = []
        for name in shown:
            mse = float(np.mean((self.gallery.pixels(name, item.index).astype(np.float64) - ref) ** 2))
            out.append(PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * np.log10(255.0**2 / mse)))
        return out


@dataclass(frozen=True)
class ClassifierJudge:
    gallery: Gallery

    def __post_init__(self) -> None:
        if not DigitsMetrics.applies_to(self.gallery.shape) or any(item.label is None for item in self.gallery.pool):
            raise UserError(f"The classifier judge scores class-conditional 1x32x32 digits; this arena's images are "
                            f"{self.gallery.shape}. Use --judge psnr.")  # fmt: skip

    @torch.no_grad()
    def scores(self, shown: Sequence[str], item: Item) -> list[float]:
        pixels = np.stack([self.gallery.pixels(name, item.index) for name in shown])
        images = torch.from_numpy(pixels).float().div(127.5).sub(1.0)[:, None]
        probabilities = digits_metrics().classifier(images).softmax(1)
        return probabilities[:, item.label].tolist()


JUDGES: dict[str, Callable[[Gallery, str | None], object]] = {
    "psnr": lambda gallery, reference: PsnrJudge(gallery, reference),
    "classifier": lambda gallery, reference: ClassifierJudge(gallery),
}


def make_judge(name: str, gallery: Gallery, reference: str | None):
    if name not in JUDGES:
        raise UserError(f"Unknown judge '{name}'; judges: {', '.join(JUDGES)}.")
    if name == "psnr" and reference is None:
        raise UserError("The psnr judge compares with a reference variant: pass --reference NAME (the FP model).")
    return JUDGES[name](gallery, reference)
