"""The bucketed runtime: a denoiser that runs each sample through the engine of its timestep's bucket.

It has the interface the samplers use (`sample_shape`, `conditioning(labels)`, `eps = denoiser(x, t, cond)`),
so `dilatequant sample|eval --engines DIR` generate through the engines with diffusers' schedulers. A batch
may mix timesteps: it is split by bucket and put back together in order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dilatequant.core.denoiser import LoadedModel, ModelSpec, SpecMixin
from dilatequant.core.errors import UserError

from .config import BuildConfig
from .engine import EngineSet, load


class EngineDenoiser(SpecMixin):
    def __init__(self, engines: EngineSet, clamp: bool = False) -> None:
        self.engines, self.clamp = engines, clamp
        self.spec = ModelSpec(engines.manifest["model"]["family"], engines.manifest["model"]["config"])
        self.low, self.high = engines.manifest["calibrated_range"]

    @property
    def timed_tokens(self) -> int:
        """The encoder-state length to time and size the engines at: the one they were built for (77, CLIP's, by
        default), not the stand-ins' 8 that sampling without prompts uses."""
        manifest = self.engines.manifest
        return BuildConfig.from_dict(manifest["build"], manifest["format_version"]).opt_tokens

    def close(self) -> None:
        """Release the engines (sessions, thread pools, device memory)."""
        self.engines.close()

    def buckets_of(self, t: torch.Tensor) -> torch.Tensor:
        """Bucket index per sample; timesteps outside the calibrated range are refused unless clamping."""
        outside = (t < self.low) | (t > self.high)
        if outside.any() and not self.clamp:
            raise UserError(f"Timestep {int(t[outside][0])} is outside the range the engines in {self.engines.path} were "
                            f"calibrated on ({self.low}..{self.high}). Sample with the calibrated schedule, or pass --clamp "
                            "to use the nearest bucket's scales.")  # fmt: skip
        return torch.from_numpy(self.engines.table.buckets_of(t.clamp(self.low, self.high)))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        t = t.reshape(-1).expand(len(x)) if t.numel() == 1 else t
        if len(t) != len(x) or (cond is not None and len(cond) != len(x)):
            raise UserError(f"Batch mismatch: x has {len(x)} samples, t {len(t)}, cond {len(cond) if cond is not None else '-'}.")
        if tuple(x.shape[1:]) != self.sample_shape:
            raise UserError(f"x has shape {tuple(x.shape[1:])} per sample; the engines in {self.engines.path} take {self.sample_shape}.")
        buckets = self.buckets_of(t.cpu())
        eps = torch.empty_like(x, device="cpu", dtype=torch.float32)
        for k in buckets.unique().tolist():
            rows = (buckets == k).nonzero().flatten()
            out = self.engines.run(k, x[rows].cpu().numpy(), t[rows].cpu().numpy().astype(np.int64),
                                   cond[rows].cpu().numpy() if cond is not None else None)  # fmt: skip
            eps[rows] = torch.from_numpy(out)
        return eps.to(x.device)


def load_engine_model(path: str | Path, clamp: bool = False) -> LoadedModel:
    """An engine directory as a LoadedModel, for everything that samples or evaluates."""
    engines = load(path)
    model = engines.manifest["model"]
    return LoadedModel(EngineDenoiser(engines, clamp), model["scheduler_config"], Path(path), f"engines:{path}")  # type: ignore[arg-type]
