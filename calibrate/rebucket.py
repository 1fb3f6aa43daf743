"""Re-bucketing a calibration: the calibrated fake-quant model with one activation row per timestep bucket, and
the per-bucket activation tables export writes into its graphs (`bucket_scales`).

Calibration learns one row per calibrated timestep; a deployment has K buckets (core/buckets.py). This is
calibrate's public function for that step, so export reads tables, not quantizer internals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dilatequant.core.buckets import BucketTable
from dilatequant.core.denoiser import LoadedModel, ModelSpec
from dilatequant.core.sampling import default_batch_size

from .artifact import CalibrationArtifact
from .attention import uniform_softmax
from .initialise import Candidates, covering_grid, initialise_activations, select_rows, write_candidates
from .quant_model import OUTPUT_SUFFIX
from .timesteps import TimestepIndex

# Latent values per forward of the observation pass (one SD-1.5-size latent, 4x64x64): a forward's activations grow
# with the latent, and at SD-1.5 size they decided export's peak, beside the 3.7 GiB fake-quant model. Measured there
# (fresh process, 2 cores, 8 samples): 8 latents per forward held 1.0 GiB more, 2 latents 0.5 GiB, 1 latent 0.17-0.33
# GiB, the pass taking about as long (29-34 s). Small latents keep the device's default batch. Min/max tables reduce
# exactly over any split of the samples, but the forward itself is not batch-invariant on the CPU (SD-1.5 size,
# batch 1 vs 8: the observed tables within 1.3e-6 relative, float rounding), and percentile/MSE sums add in another
# grouping.
OBSERVE_LATENT_VALUES = 4 * 64 * 64


class BucketIndex(TimestepIndex):
    """A TimestepIndex whose rows are buckets: each sample's timestep picks its bucket's row."""

    def __init__(self, table: BucketTable) -> None:
        super().__init__(torch.arange(len(table)))
        self.table = table

    def lookup(self, t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.table.buckets_of(torch.as_tensor(t).detach().cpu().flatten()))


def observation_batch(sample_values: int, device: torch.device | str) -> int:
    """Samples per forward when observing calibration samples of `sample_values` latent values each: the device's
    default batch, fewer where that many latents exceed OBSERVE_LATENT_VALUES (at least one)."""
    return max(1, min(default_batch_size(device), OBSERVE_LATENT_VALUES // max(1, sample_values)))


def bucketed_model(artifact: CalibrationArtifact, table: BucketTable, device: torch.device | str = "cpu",
                   quantized_outputs: frozenset[str] = frozenset(), scales: str = "calibrated",
                   batch_size: int | None = None) -> LoadedModel:  # fmt: skip
    """The artifact's fake-quant model with one activation row per bucket.

    scales 'calibrated' (the default): each bucket takes the calibrated rows of its timesteps — exactly when it
    holds one timestep; otherwise, of its rows and the grid covering all of them, the one with the least
    quantization error on the bucket's calibration samples (the covering grid for min-max recipes, which
    equals min-max over the bucket's samples). So what distillation learned reaches the graphs.
    'rederived': every bucket re-initialised from its calibration samples (the calibration's initialisation
    method), ignoring the learned rows. The layers in `quantized_outputs` get bucketed 8-bit output
    quantizers, which calibration did not have, and log√2 softmax quantizers become uniform tables (the form the
    runtimes run); both are initialised from the bucket's samples either way.
    """
    loaded = artifact.rebuild(BucketIndex(table), device)
    config, denoiser = artifact.config, loaded.denoiser
    denoiser.quantize_outputs(quantized_outputs, 8, config.act_symmetric)
    softmax = frozenset(uniform_softmax(denoiser.model, config.act_bits, config.act_symmetric))
    quantizers = denoiser.act_quantizers()
    data, device = artifact.calibration_data(), torch.device(device)
    batch_size = batch_size or observation_batch(data.x[0].numel(), device)
    method = config.act_init
    added = {name for name in quantizers if name.endswith(OUTPUT_SUFFIX)} | softmax  # tables calibration did not have
    # without TPQ the one calibrated row (restored as it is) serves every bucket
    inputs = [name for name in quantizers if name not in added] if config.tpq else []
    new = None if scales == "rederived" else added
    if new is None or new:
        initialise_activations(denoiser, data, method, config.percentile, batch_size, device, progress=False, only=new)
    if scales == "calibrated" and inputs:  # (no pass over the data when there is nothing to choose)
        candidates = {name: bucket_candidates(artifact, table, name, quantizers[name].fmt) for name in inputs}
        if method == "minmax":  # the covering grid (candidate 0) is min-max over the bucket's samples
            for name, rows in candidates.items():
                write_candidates(quantizers[name], rows, [0] * len(rows))
        else:
            select_rows(denoiser, data, candidates, batch_size, device, progress=False)
    return loaded


def bucket_candidates(artifact: CalibrationArtifact, table: BucketTable, group: str, fmt) -> Candidates:
    """Per bucket: the grid covering its calibrated rows, then the rows themselves (one row: just that row)."""
    steps, zeros = artifact.act_table(group)
    position = {t: i for i, t in enumerate(artifact.record.timesteps)}
    candidates = []
    for k in range(len(table)):
        rows = sorted({position[table.grid[r]] for r in table.rows(k)}) if len(steps) > 1 else [0]
        if len(rows) == 1:
            candidates.append((steps[rows], zeros[rows]))
            continue
        cover_step, cover_zero = covering_grid(steps[rows], zeros[rows], fmt)
        candidates.append((torch.cat([cover_step.reshape(1), steps[rows]]), torch.cat([cover_zero.reshape(1), zeros[rows]])))
    return candidates


@dataclass(frozen=True)
class GroupTable:
    """One activation quantizer's row per bucket, as a graph's QuantizeLinear takes it."""

    steps: np.ndarray  # (K,) float: the scale of each bucket
    zero_points: np.ndarray  # (K,) int
    symmetric: bool
    prescale: np.ndarray | None  # per input channel: 1/dilation, when dilation is a pre-scale (None: folded or none)
    output: bool  # quantizes a layer's output (ort-cpu fusion), not an input


@dataclass(frozen=True)
class BucketScales:
    """Everything export needs from a re-bucketed calibration: the tables (in quantizer order) and the model's
    spec and scheduler (what a runtime samples with)."""

    groups: dict[str, GroupTable]
    spec: ModelSpec
    scheduler_config: dict


def bucket_scales(artifact: CalibrationArtifact, table: BucketTable, quantized_outputs: frozenset[str] = frozenset(),
                  scales: str = "calibrated", device: torch.device | str = "cpu", batch_size: int | None = None) -> BucketScales:  # fmt: skip
    """The per-bucket activation tables of `bucketed_model` (same arguments), as plain arrays."""
    loaded = bucketed_model(artifact, table, device, quantized_outputs, scales, batch_size)
    groups = {}
    for name, quantizer in loaded.denoiser.act_quantizers().items():
        prescaled = quantizer.prescale and bool((quantizer.dilation != 1).any())  # a Mul by ones is no pre-scale
        steps, zeros = (v.detach().cpu().expand(len(table)) for v in (quantizer.step, quantizer.zero_point))  # one row: shared
        groups[name] = GroupTable(steps.float().numpy(), zeros.numpy().astype(np.int64),
                                  quantizer.fmt.symmetric, quantizer.dilation.reciprocal().cpu().numpy().astype(np.float32) if prescaled else None,
                                  name.endswith(OUTPUT_SUFFIX))  # fmt: skip
    return BucketScales(groups, loaded.denoiser.spec, loaded.scheduler_config)
