"""Q-DiT's group-size search inside a calibration (`group_search=True`): one gene per group-wise Linear input
group (layers sharing an input share a group size), the search of calibrate/search.py, and a fitness measured on
images the fake-quantized model samples.

The default fitness samples `search_images` images (balanced classes, the calibration's sampler and seed) and
compares them with the FP model's images of the same noise: fid_digits where the digits metrics apply (Q-DiT
optimises FID), else −psnr against FP. A caller may pass its own `fitness(model) -> float` (lower is better).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dilatequant.core.denoiser import LoadedModel
from dilatequant.core.evaluate import labels_for, score
from dilatequant.core.metrics import DigitsMetrics
from dilatequant.core.sampling import SamplerConfig, default_batch_size, sample

from .config import CalibConfig
from .distributed import SINGLE, Ranks
from .quant_model import QuantizedDenoiser, set_group_sizes
from .search import SearchConfig, search

ModelFitness = Callable[[QuantizedDenoiser], float]


def searchable_widths(quantized: QuantizedDenoiser) -> dict[str, int]:
    """Input group -> its input channels, for the groups the plan quantizes group-wise."""
    wrappers = quantized.quant_layers()
    return {row.group: wrappers[row.layer].layer.in_features for row in quantized.plan if row.group_size}


def image_fitness(loaded: LoadedModel, config: CalibConfig, device: torch.device) -> tuple[ModelFitness, str]:
    """The default fitness and its name: fid_digits of the sampled images, or −psnr against FP on the same noise."""
    labels = labels_for(loaded, config.search_images)
    sampler = SamplerConfig(config.scheduler, config.steps, config.seed, default_batch_size(device))
    reference = sample(loaded.denoiser, loaded.scheduler_config, labels, sampler, device, progress=False)
    digits = DigitsMetrics.applies_to(loaded.denoiser.sample_shape)

    def fitness(model: QuantizedDenoiser) -> float:
        metrics = score(sample(model, loaded.scheduler_config, labels, sampler, device, progress=False), labels, reference)
        return metrics["fid_digits"] if digits else -metrics["psnr_vs_ref"]

    return fitness, "fid_digits" if digits else "-psnr_vs_fp"


def search_group_sizes(quantized: QuantizedDenoiser, loaded: LoadedModel, config: CalibConfig, device: torch.device,
                       state_path: Path | None, fitness: ModelFitness | None = None, progress: bool = True,
                       ranks: Ranks = SINGLE) -> dict:  # fmt: skip
    """Search (on several ranks, each evaluating its share of the genomes), apply the best group sizes to `quantized`
    and return what the artifact records."""
    metric = "caller's fitness"
    if fitness is None:
        fitness, metric = image_fitness(loaded, config, device)

    def genome_fitness(sizes: dict[str, int]) -> float:
        set_group_sizes(quantized, sizes, config)
        with torch.no_grad():
            return fitness(quantized)

    settings = SearchConfig(config.group_choices, config.weight_group_size, config.search_population, config.search_top_k,
                            config.search_generations, seed=config.seed)  # fmt: skip
    result = search(searchable_widths(quantized), genome_fitness, settings, state_path, progress, ranks)
    set_group_sizes(quantized, result.best, config)
    return {"metric": metric, "best": result.best, "fitness": result.fitness, "evaluations": result.evaluations,
            "history": result.history, "seconds": round(result.seconds, 1), "resumed": result.resumed}  # fmt: skip
