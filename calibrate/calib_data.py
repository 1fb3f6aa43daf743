"""Calibration data: denoiser inputs (x_t, t, conditioning) recorded along seeded FP sampling trajectories,
then selected (calibrate/selection.py: random, uniform or TDAC). The selection's record travels with the data
(in the safetensors metadata), so a resumed run records it too.

With prompts (a text-to-image pipeline), labels index the pipeline's encoded prompts, which travel with the data;
under classifier-free guidance every step calls the denoiser on the prompt and on the negative prompt, and both
halves are recorded (the negative half labelled `prompts.negative_label`), as the deployed pipeline will call it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

from dilatequant.core.denoiser import Denoiser, LoadedModel
from dilatequant.core.errors import UserError
from dilatequant.core.families import get_family
from dilatequant.core.pipelines import PromptTable, encode_prompts, pipeline_dir_of
from dilatequant.core.sampling import SamplerConfig, balanced_labels, sample

from .config import CalibConfig
from .selection import NEEDS_FEATURES, SELECTORS, Pool


@dataclass
class CalibrationData:
    x: torch.Tensor  # (N, C, H, W) scaled model inputs
    t: torch.Tensor  # (N,) timestep values
    labels: torch.Tensor  # (N,) class ids, or prompt indices with `prompts` (conditioning is rebuilt from them)
    selection: dict = field(default_factory=dict)  # how the samples were chosen (selection.py's record)
    prompts: PromptTable | None = None  # the encoded prompts that labels index

    def __len__(self) -> int:
        return len(self.t)

    def subset(self, n: int) -> CalibrationData:
        """The first n samples (the set is already in random order)."""
        return CalibrationData(self.x[:n], self.t[:n], self.labels[:n], self.selection, self.prompts)

    def to_bytes(self) -> bytes:
        """safetensors bytes (written atomically by the caller)."""
        tensors = {"x": self.x.contiguous(), "t": self.t.contiguous(), "labels": self.labels.contiguous()}
        metadata = {"selection": json.dumps(self.selection)} if self.selection else {}
        if self.prompts is not None:
            tensors["prompt_rows"] = self.prompts.rows.contiguous()
            metadata.update(self.prompts.metadata())
        return save(tensors, metadata=metadata or None)

    @classmethod
    def load(cls, path: Path) -> CalibrationData:
        with safe_open(str(path), "pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}
            metadata = file.metadata() or {}
        prompts = PromptTable.from_tensors(tensors["prompt_rows"], metadata) if "prompt_rows" in tensors else None
        return cls(tensors["x"], tensors["t"], tensors["labels"], json.loads(metadata.get("selection", "{}")), prompts)


class _Recorder:
    """Passes calls through to the denoiser and keeps every input, in call order; with `feature_steps`, also the
    input of the family's middle-feature module during the first that many calls (the first batch)."""

    def __init__(self, denoiser: Denoiser, feature_steps: int = 0) -> None:
        self.denoiser, self.calls, self.features = denoiser, [], []
        self.sample_shape = denoiser.sample_shape
        if feature_steps:
            site = dict(denoiser.model.named_modules())[get_family(denoiser.family).feature_site(denoiser.model)]
            self.hook = site.register_forward_pre_hook(lambda module, args: self.keep_feature(args[0], feature_steps))

    def keep_feature(self, feature: torch.Tensor, steps: int) -> None:
        if len(self.features) < steps:
            self.features.append(feature.detach().float().cpu())

    @property
    def prompts(self) -> PromptTable | None:
        return self.denoiser.prompts

    def conditioning(self, labels: torch.Tensor) -> torch.Tensor | None:
        return self.denoiser.conditioning(labels)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        self.calls.append((x.detach().cpu(), t.detach().cpu()))
        return self.denoiser(x, t, cond)


def attach_prompts(loaded: LoadedModel, config: CalibConfig, data: CalibrationData | None = None) -> None:
    """Give the denoiser the encoded prompts of `config` (those of a resumed run's `data`), so its conditioning
    follows them; no prompts, nothing to do."""
    if not config.prompts:
        return
    pipeline = pipeline_dir_of(loaded.model_dir)
    if pipeline is None:
        raise UserError(f"--prompts needs a text-to-image pipeline directory (model_index.json with its text encoder); "
                        f"{loaded.model_dir} is a bare denoiser. Pass the pipeline's directory as --model.")  # fmt: skip
    loaded.denoiser.prompts = data.prompts if data is not None else encode_prompts(pipeline, list(config.prompts), config.negative_prompt)


def collect(denoiser: Denoiser, scheduler_config: dict, config: CalibConfig, device: torch.device,
            batch_size: int, progress: bool = True) -> CalibrationData:  # fmt: skip
    """Sample `config.trajectories` FP trajectories and select `config.samples` inputs from them (with guidance,
    a trajectory's negative-prompt half counts as one more trajectory to choose from)."""
    tdac = config.timestep_sampling in NEEDS_FEATURES
    recorder = _Recorder(denoiser, config.steps if tdac else 0)
    prompts = denoiser.prompts
    labels = prompts.labels(config.trajectories) if prompts else balanced_labels(config.trajectories, min(10, denoiser.num_classes or 10))
    sampler = SamplerConfig(config.scheduler, config.steps, config.seed, batch_size, guidance_scale=config.guidance_scale)
    try:
        sample(recorder, scheduler_config, labels, sampler, device, progress)
    finally:
        if tdac:
            recorder.hook.remove()
    # calls are batch-major: for each batch, one call per step
    batches = [recorder.calls[i : i + config.steps] for i in range(0, len(recorder.calls), config.steps)]
    x = torch.cat([torch.stack([call[0] for call in batch], 1) for batch in batches])  # (M, T, C, H, W)
    t = torch.stack([call[1][0] for call in batches[0]])  # (T,)
    if len(x) > len(labels):  # guided: each batch called on [negative prompt, prompts]
        labels = torch.cat([torch.cat([torch.full_like(part, prompts.negative_label), part]) for part in labels.split(batch_size)])
    pool = Pool(len(x), t.tolist(), torch.stack(recorder.features) if tdac else None)
    chosen = SELECTORS[config.timestep_sampling](pool, config.samples, torch.Generator().manual_seed(config.seed + 2),
                                                 radius=config.tdac_radius, lam=config.tdac_lambda)  # fmt: skip
    return CalibrationData(x[chosen.trajectory, chosen.step], t[chosen.step], labels[chosen.trajectory], chosen.record, prompts)


@torch.no_grad()
def run_over(denoiser: Denoiser, data: CalibrationData, batch_size: int, device: torch.device, desc: str, progress: bool) -> None:
    """Call `denoiser` on every calibration sample, a batch at a time (for the hooks that observe it)."""
    for start in tqdm(range(0, len(data), batch_size), desc=desc, disable=not progress):
        labels = data.labels[start : start + batch_size]
        cond = denoiser.conditioning(labels)
        denoiser(data.x[start : start + batch_size].to(device), data.t[start : start + batch_size].to(device),
                 cond.to(device) if cond is not None else None)  # fmt: skip
