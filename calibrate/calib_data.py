"""Calibration data: denoiser inputs (x_t, t, conditioning) recorded along seeded FP sampling trajectories,
then selected (calibrate/selection.py: random, uniform or TDAC). The selection's record travels with the data
(in the safetensors metadata), so a resumed run records it too.

With prompts (a text-to-image pipeline), labels index the pipeline's encoded prompts, which travel with the data;
under classifier-free guidance every step calls the denoiser on the prompt and on the negative prompt, and both
halves are recorded (the negative half labelled `prompts.negative_label`), as the deployed pipeline will call it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Container
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
from .distributed import SINGLE, Ranks
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
    """Passes calls through to the denoiser and keeps every input, per sampling batch (`steps` calls each); with
    `feature_steps`, also the input of the family's middle-feature module during the first that many calls it passes
    (its first batch). Batches in `skip` (other ranks') are not run: their calls return zeros, which keeps the sampler's
    noise draws where one process has them at almost no cost."""

    def __init__(self, denoiser: Denoiser, steps: int, feature_steps: int = 0, skip: Container[int] = ()) -> None:
        self.denoiser, self.steps, self.skip = denoiser, steps, skip
        self.batches: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.features, self.made = [], 0
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
        batch, self.made = self.made // self.steps, self.made + 1
        if batch in self.skip:
            return torch.zeros_like(x)
        self.batches.setdefault(batch, []).append((x.detach().cpu(), t.detach().cpu()))
        return self.denoiser(x, t, cond)

    def recorded(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per recorded batch: its inputs (rows, steps, C, H, W) and timesteps (steps,)."""
        return {k: (torch.stack([x for x, _ in calls], 1), torch.stack([t[0] for _, t in calls])) for k, calls in self.batches.items()}


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
            batch_size: int, progress: bool = True, ranks: Ranks = SINGLE) -> CalibrationData:  # fmt: skip
    """Sample `config.trajectories` FP trajectories and select `config.samples` inputs from them (with guidance,
    a trajectory's negative-prompt half counts as one more trajectory to choose from).

    On several ranks, sampling batch k (of `batch_size`, as one process samples) is rank k mod N's; the batches are
    gathered and every rank makes the same selection. Every batch is computed as one process computes it, and the
    batches of other ranks still draw DDPM's noise, so the set is one process's, bit for bit. The recording divides
    only when there are at least N batches (trajectories > (N - 1) x batch_size)."""
    tdac = config.timestep_sampling in NEEDS_FEATURES
    prompts = denoiser.prompts
    labels = prompts.labels(config.trajectories) if prompts else balanced_labels(config.trajectories, min(10, denoiser.num_classes or 10))
    n_batches = -(-config.trajectories // batch_size)
    recorder = _Recorder(denoiser, config.steps, config.steps if tdac else 0, set(range(n_batches)) - set(ranks.shard(n_batches)))
    sampler = SamplerConfig(config.scheduler, config.steps, config.seed, batch_size, guidance_scale=config.guidance_scale)
    try:
        sample(recorder, scheduler_config, labels, sampler, device, progress)
    finally:
        if tdac:
            recorder.hook.remove()
    mine = recorder.recorded()
    batches = ranks.in_order([mine[k] for k in ranks.shard(n_batches)], n_batches, "recording the FP trajectories")
    x = torch.cat([b[0] for b in batches])  # (M, T, C, H, W)
    t = batches[0][1]  # (T,)
    if len(x) > len(labels):  # guided: each batch called on [negative prompt, prompts]
        labels = torch.cat([torch.cat([torch.full_like(part, prompts.negative_label), part]) for part in labels.split(batch_size)])
    # TDAC reads the first batch's features: rank 0's
    features = ranks.from_main(lambda: torch.stack(recorder.features), "TDAC's features") if tdac else None
    pool = Pool(len(x), t.tolist(), features)
    chosen = SELECTORS[config.timestep_sampling](pool, config.samples, torch.Generator().manual_seed(config.seed + 2),
                                                 radius=config.tdac_radius, lam=config.tdac_lambda)  # fmt: skip
    return CalibrationData(x[chosen.trajectory, chosen.step], t[chosen.step], labels[chosen.trajectory], chosen.record, prompts)


@torch.no_grad()
def run_over(denoiser: Denoiser, data: CalibrationData, batch_size: int, device: torch.device, desc: str, progress: bool,
             ranks: Ranks = SINGLE, before_batch: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Call `denoiser` on every calibration sample, a batch at a time (for the hooks that observe it); on several
    ranks, each calls it on its shard of the batches (batch k is rank k mod N's)."""
    starts = range(0, len(data), batch_size)
    for k in tqdm(ranks.shard(len(starts)), desc=desc, disable=not progress):
        start = starts[k]
        if before_batch is not None:
            before_batch()
        labels = data.labels[start : start + batch_size]
        cond = denoiser.conditioning(labels)
        denoiser(data.x[start : start + batch_size].to(device), data.t[start : start + batch_size].to(device),
                 cond.to(device) if cond is not None else None)  # fmt: skip
