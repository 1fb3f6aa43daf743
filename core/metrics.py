"""Quality metrics for generated digits: class_accuracy, fid_digits and paired PSNR against a reference run.

fid_digits is the Fréchet distance between Gaussians fitted to the metric classifier's 64-d penultimate
features of the generated samples and of all 1,797 real digits. It is comparable only between runs with
the same n: its small-n bias is large (see the README for the seed-to-seed noise floor).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from .classifier import DigitsClassifier
from .digits_data import IMAGE_SIZE, load_digits_images
from .zoo import CLASSIFIER_DIR

DIGITS_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)
# Images live in [-1, 1]: PSNR's peak-to-peak range is 2. A perfect match is capped at this MSE.
PSNR_RANGE = 2.0
MIN_MSE = 1e-12


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of row-wise feature vectors."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with scipy's matrix square root."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if caught or not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than dimensions): regularise as pytorch-fid does.
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real  # imaginary parts are numerical noise for PSD inputs
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def psnr_vs_ref(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the paired PSNR in dB (images in [-1, 1], identical initial noise)."""
    if images.shape != reference.shape:
        raise ValueError(f"PSNR needs paired images of one shape; got {tuple(images.shape)} and {tuple(reference.shape)}.")
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1).clamp_min(MIN_MSE)
    return float((10.0 * torch.log10(PSNR_RANGE**2 / mse)).mean())


class DigitsMetrics:
    """class_accuracy and fid_digits with the bundled classifier; real-data statistics computed once."""

    def __init__(self, classifier_dir: str | Path = CLASSIFIER_DIR, batch_size: int = 500) -> None:
        self.classifier = DigitsClassifier.from_pretrained(classifier_dir)
        self.batch_size = batch_size
        self._real_stats: tuple[np.ndarray, np.ndarray] | None = None

    @staticmethod
    def applies_to(sample_shape: tuple[int, ...]) -> bool:
        return tuple(sample_shape) == DIGITS_SHAPE

    @torch.no_grad()
    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) for CPU images, batched."""
        features = torch.cat([self.classifier.features(b.float()) for b in images.split(self.batch_size)])
        return features, self.classifier.head(features)

    def real_stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self._real_stats is None:
            self._real_stats = gaussian_stats(self._run(load_digits_images()[0])[0].numpy())
        return self._real_stats

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """{'class_accuracy', 'fid_digits'} of generated images for the requested labels."""
        if len(images) < 2:
            raise ValueError("fid_digits needs at least 2 samples.")
        features, logits = self._run(images.clamp(-1, 1))
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        fid = frechet_distance(*gaussian_stats(features.numpy()), *self.real_stats())
        return {"class_accuracy": accuracy, "fid_digits": fid}


@functools.lru_cache(maxsize=4)
def digits_metrics(classifier_dir: str | Path = CLASSIFIER_DIR) -> DigitsMetrics:
    """One DigitsMetrics per classifier directory: the classifier and the real-data statistics load once."""
    return DigitsMetrics(classifier_dir)
