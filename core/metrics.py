"""Quality metrics for generated digits: class_accuracy, fid_digits, and paired PSNR and LPIPS against a reference run.

fid_digits is the Fréchet distance between Gaussians fitted to the metric classifier's 64-d penultimate
features of the generated samples and of all 1,797 real digits. It is comparable only between runs with
the same n: its small-n bias is large (see the README for the seed-to-seed noise floor).

lpips_vs_ref is torchmetrics' LearnedPerceptualImagePatchSimilarity (AlexNet; LPIPS's linear layers ship inside
torchmetrics, the AlexNet backbone comes from torchvision's ImageNet weights in torch's hub cache). Nothing here
downloads: without the packages or the weights file it is skipped with a one-line reason (lpips_unavailable).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from .classifier import DigitsClassifier
from .digits_data import IMAGE_SIZE, load_digits_images
from .errors import UserError
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


# torchvision's AlexNet_Weights.IMAGENET1K_V1 (checked against the installed torchvision when it loads). torchvision
# reads it from torch.hub.get_dir()/checkpoints and downloads it only when it is missing, so its presence is checked first.
ALEXNET_WEIGHTS_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
# LPIPS was calibrated on 64x64 patches, and torchmetrics resizes to 64 where it resizes. AlexNet's LPIPS layers
# accept 31 px and up, but at 32 px (the digits) its last three layers see one 1x1 map: smaller sides are upsampled
# (bilinear) to 64 first.
LPIPS_MIN_SIDE = 64
LPIPS_BATCH = 64


class LpipsUnavailable(UserError):
    """LPIPS cannot run here (missing package or weights, or a torchvision that does not load); one line says why."""


def alexnet_weights_path() -> Path:
    """Where torchvision looks for AlexNet's ImageNet weights: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(ALEXNET_WEIGHTS_URL).name


def lpips_unavailable() -> str | None:
    """Why lpips_vs_ref cannot run, in one line, or None; imports nothing and touches no network."""
    missing = [name for name in ("torchmetrics", "torchvision") if importlib.util.find_spec(name) is None]
    weights = alexnet_weights_path()
    needs = []
    if missing:
        needs.append(f"{' and '.join(missing)} (pip install 'dilatequant[lpips]')")
    if not weights.is_file():
        needs.append(f"torchvision's AlexNet weights offline: copy {weights.name} ({ALEXNET_WEIGHTS_URL}) into {weights.parent}")
    return f"LPIPS needs {' and '.join(needs)}." if needs else None


@functools.lru_cache(maxsize=2)
def _lpips_metric(weights: str):
    """torchmetrics' LPIPS (AlexNet) with the backbone read from `weights`, which must exist (checked by the caller)."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        from torchvision.models import AlexNet_Weights
    except Exception as exc:  # not only ImportError: a CUDA torchvision beside a CPU torch raises RuntimeError
        raise LpipsUnavailable(
            f"LPIPS needs a torchvision built for torch {torch.__version__}; importing it failed ({first_line(exc)})."
        ) from None
    expected = Path(AlexNet_Weights.DEFAULT.url).name
    if expected != Path(weights).name:  # a torchvision that wants another file would download it
        raise LpipsUnavailable(f"LPIPS: this torchvision wants {expected}, not {Path(weights).name}, in {Path(weights).parent}.")
    try:
        return LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean", normalize=False)
    except Exception as exc:  # a truncated or foreign weights file
        raise LpipsUnavailable(f"LPIPS could not load {weights} ({first_line(exc)}); replace it with {ALEXNET_WEIGHTS_URL}.") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def lpips_input(images: torch.Tensor) -> torch.Tensor:
    """NCHW 1- or 3-channel images as LPIPS takes them: in [-1, 1], 3 channels (grayscale repeated), and the short
    side upsampled to LPIPS_MIN_SIDE where it is shorter."""
    images = images.float().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    height, width = images.shape[-2:]
    if min(height, width) < LPIPS_MIN_SIDE:
        scale = LPIPS_MIN_SIDE / min(height, width)
        size = (round(height * scale), round(width * scale))
        images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)  # stays in [-1, 1]
    return images


@torch.no_grad()
def lpips_vs_ref(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the paired LPIPS (AlexNet) distance, images in [-1, 1]; lower is closer. Raises
    LpipsUnavailable, with a one-line reason, where it cannot run (see lpips_unavailable); never downloads."""
    if images.shape != reference.shape:
        raise ValueError(f"LPIPS needs paired images of one shape; got {tuple(images.shape)} and {tuple(reference.shape)}.")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise LpipsUnavailable(f"LPIPS needs 1- or 3-channel images; these samples are {tuple(images.shape[1:])}.")
    reason = lpips_unavailable()
    if reason is not None:
        raise LpipsUnavailable(reason)
    metric = _lpips_metric(str(alexnet_weights_path()))
    metric.reset()
    for a, b in zip(images.split(LPIPS_BATCH), reference.split(LPIPS_BATCH)):
        metric.update(lpips_input(a.cpu()), lpips_input(b.cpu()))
    return float(metric.compute())


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
