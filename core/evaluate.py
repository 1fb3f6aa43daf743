"""Sample a model and score it: fid_digits, class_accuracy and (with a reference model) psnr_vs_ref."""

from __future__ import annotations

import time

import torch

from .denoiser import LoadedModel
from .environment import describe_device, library_versions
from .errors import UserError
from .metrics import DigitsMetrics, digits_metrics, psnr_vs_ref
from .sampling import SamplerConfig, balanced_labels, sample


def labels_for(model: LoadedModel, n: int) -> torch.Tensor:
    return balanced_labels(n, min(10, model.denoiser.num_classes or 10))


def score(images: torch.Tensor, labels: torch.Tensor, reference_images: torch.Tensor | None = None) -> dict:
    """fid_digits and class_accuracy (for 1x32x32 digits) and psnr_vs_ref (when reference images are given)."""
    result: dict = {}
    if DigitsMetrics.applies_to(images.shape[1:]):
        result.update(digits_metrics().evaluate(images, labels))
    else:
        result["metrics_skipped"] = f"fid_digits and class_accuracy need 1x32x32 digits; these samples are {tuple(images.shape[1:])}."
    if reference_images is not None:
        result["psnr_vs_ref"] = psnr_vs_ref(images, reference_images)
    return result


def evaluate(
    model: LoadedModel,
    n: int,
    sampler: SamplerConfig,
    device: torch.device,
    reference: LoadedModel | None = None,
    progress: bool = True,
) -> dict:
    """Sample n images (balanced classes) and return the metrics with everything needed to reproduce them."""
    if n < 2:
        raise UserError(f"eval needs n >= 2 samples (got {n}).")
    if reference is not None and reference.denoiser.sample_shape != model.denoiser.sample_shape:
        raise UserError(
            f"The reference {reference.source} samples {reference.denoiser.sample_shape}, the model "
            f"{model.source} samples {model.denoiser.sample_shape}: PSNR needs the same shape. Pick a matching --ref."
        )
    labels = labels_for(model, n)
    start = time.perf_counter()
    images = sample(model.denoiser, model.scheduler_config, labels, sampler, device, progress)
    sampling_seconds = time.perf_counter() - start
    result: dict = {
        "model": model.source, "n": n, "steps": sampler.steps, "scheduler": sampler.scheduler, "seed": sampler.seed,
        "batch_size": sampler.batch_size, "device": describe_device(device), "seconds": round(sampling_seconds, 2),
        "images_per_second": round(n / sampling_seconds, 2),
    }  # fmt: skip
    reference_images = None
    if reference is not None:
        reference_images = sample(reference.denoiser, reference.scheduler_config, labels, sampler, device, progress)
        result["reference"] = reference.source
    result.update(score(images, labels, reference_images))
    if reference_images is not None:  # same labels and noise: the reference's own metrics, for paired comparisons
        result["reference_metrics"] = score(reference_images, labels)
    result["versions"] = library_versions()
    return result
