"""Calibration data: denoiser inputs (x_t, t, conditioning) recorded along seeded FP sampling trajectories.

DilateQuant's default draws samples at random timesteps from the pool of all (trajectory, step) pairs;
`uniform` gives every timestep the same number of samples, each from a different trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from dilatequant.core.denoiser import Denoiser
from dilatequant.core.sampling import SamplerConfig, balanced_labels, sample

from .config import CalibConfig


@dataclass
class CalibrationData:
    x: torch.Tensor  # (N, C, H, W) scaled model inputs
    t: torch.Tensor  # (N,) timestep values
    labels: torch.Tensor  # (N,) class ids (conditioning is rebuilt from them)

    def __len__(self) -> int:
        return len(self.t)

    def subset(self, n: int) -> CalibrationData:
        """The first n samples (the set is already in random order)."""
        return CalibrationData(self.x[:n], self.t[:n], self.labels[:n])

    def to_bytes(self) -> bytes:
        """safetensors bytes (written atomically by the caller)."""
        return save({"x": self.x.contiguous(), "t": self.t.contiguous(), "labels": self.labels.contiguous()})

    @classmethod
    def load(cls, path: Path) -> CalibrationData:
        tensors = load_file(str(path))
        return cls(tensors["x"], tensors["t"], tensors["labels"])


class _Recorder:
    """Passes calls through to the denoiser and keeps every input, in call order."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser, self.calls = denoiser, []
        self.sample_shape = denoiser.sample_shape

    def conditioning(self, labels: torch.Tensor) -> torch.Tensor | None:
        return self.denoiser.conditioning(labels)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        self.calls.append((x.detach().cpu(), t.detach().cpu()))
        return self.denoiser(x, t, cond)


def select(n_trajectories: int, n_steps: int, samples: int, mode: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(trajectory, step) indices of the calibration samples."""
    if mode == "random":
        flat = torch.randperm(n_trajectories * n_steps, generator=generator)[:samples]
        return flat // n_steps, flat % n_steps
    steps = torch.arange(samples) % n_steps
    trajectories = torch.empty(samples, dtype=torch.long)
    for step in range(n_steps):
        chosen = steps == step
        trajectories[chosen] = torch.randperm(n_trajectories, generator=generator)[: int(chosen.sum())]
    return trajectories, steps


def collect(denoiser: Denoiser, scheduler_config: dict, config: CalibConfig, device: torch.device,
            batch_size: int, progress: bool = True) -> CalibrationData:  # fmt: skip
    """Sample `config.trajectories` FP trajectories and draw `config.samples` inputs from them."""
    recorder = _Recorder(denoiser)
    labels = balanced_labels(config.trajectories, min(10, denoiser.num_classes or 10))
    sampler = SamplerConfig(config.scheduler, config.steps, config.seed, batch_size)
    sample(recorder, scheduler_config, labels, sampler, device, progress)
    # calls are batch-major: for each batch, one call per step
    batches = [recorder.calls[i : i + config.steps] for i in range(0, len(recorder.calls), config.steps)]
    x = torch.cat([torch.stack([call[0] for call in batch], 1) for batch in batches])  # (M, T, C, H, W)
    t = torch.stack([call[1][0] for call in batches[0]])  # (T,)
    trajectory, step = select(config.trajectories, config.steps, config.samples, config.timestep_sampling,
                              torch.Generator().manual_seed(config.seed + 2))  # fmt: skip
    return CalibrationData(x[trajectory, step], t[step], labels[trajectory])
