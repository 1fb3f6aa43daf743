"""Sample a model and score it: fid_digits, class_accuracy and (with a reference model) psnr_vs_ref and lpips_vs_ref.
A model given prompts (core/pipelines.py) generates through its pipeline's VAE and is scored on the decoded images."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .denoiser import LoadedModel
from .environment import describe_device, library_versions
from .errors import UserError
from .metrics import DigitsMetrics, LpipsUnavailable, digits_metrics, lpips_vs_ref, psnr_vs_ref
from .pipelines import decode_latents
from .sampling import SamplerConfig, balanced_labels, sample


def labels_for(model: LoadedModel, n: int) -> torch.Tensor:
    """Prompt indices cycling over the model's prompts, else class ids cycling over (at most) ten classes."""
    prompts = model.denoiser.prompts
    return prompts.labels(n) if prompts is not None else balanced_labels(n, min(10, model.denoiser.num_classes or 10))


def generate(model: LoadedModel, labels: torch.Tensor, sampler: SamplerConfig, device: torch.device, progress: bool = True) -> torch.Tensor:
    """Images in [-1, 1] for `labels`: sampled, and with prompts decoded by the pipeline's VAE from the latents."""
    prompts = model.denoiser.prompts
    images = sample(model.denoiser, model.scheduler_config, labels, sampler, device, progress, latents=prompts is not None)
    return decode_latents(Path(prompts.pipeline), images) if prompts is not None else images


def score(images: torch.Tensor, labels: torch.Tensor, reference_images: torch.Tensor | None = None, lpips: bool = False) -> dict:
    """fid_digits and class_accuracy (for 1x32x32 digits), psnr_vs_ref when reference images are given, and with
    `lpips` also lpips_vs_ref (or, where LPIPS cannot run, lpips_skipped: why, in one line)."""
    result: dict = {}
    if DigitsMetrics.applies_to(images.shape[1:]):
        result.update(digits_metrics().evaluate(images, labels))
    else:
        result["metrics_skipped"] = f"fid_digits and class_accuracy need 1x32x32 digits; these samples are {tuple(images.shape[1:])}."
    if reference_images is not None:
        result["psnr_vs_ref"] = psnr_vs_ref(images, reference_images)
    if reference_images is not None and lpips:
        try:
            result["lpips_vs_ref"] = lpips_vs_ref(images, reference_images)
        except LpipsUnavailable as exc:
            result["lpips_skipped"] = str(exc)
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
    images = generate(model, labels, sampler, device, progress)
    sampling_seconds = time.perf_counter() - start
    result: dict = {
        "model": model.source, "n": n, "steps": sampler.steps, "scheduler": sampler.scheduler, "seed": sampler.seed,
        "batch_size": sampler.batch_size, "device": describe_device(device), "seconds": round(sampling_seconds, 2),
        "images_per_second": round(n / sampling_seconds, 2),
    }  # fmt: skip
    if model.denoiser.prompts is not None:
        prompts = model.denoiser.prompts
        result.update(prompts=prompts.prompts, negative_prompt=prompts.negative_prompt, guidance_scale=sampler.guidance_scale)
    reference_images = None
    if reference is not None:
        reference_images = generate(reference, labels, sampler, device, progress)
        result["reference"] = reference.source
    result.update(score(images, labels, reference_images, lpips=True))
    if reference_images is not None:  # same labels and noise: the reference's own metrics, for paired comparisons
        result["reference_metrics"] = score(reference_images, labels)
    result["versions"] = library_versions()
    return result
