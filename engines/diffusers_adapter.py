"""`as_diffusers(ENGINES)`: engines as a drop-in denoiser for a diffusers pipeline.

    pipe = diffusers.DDIMPipeline.from_pretrained(MODEL_DIR)      # or StableDiffusionPipeline, PixArtAlphaPipeline, ...
    pipe.unet = dilatequant.as_diffusers("engines")       # pipe.transformer = ... for a DiT or PixArt pipeline
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).images

The module takes the call signature of the model class the engines were exported from (UNet2DModel,
UNet2DConditionModel, DiTTransformer2DModel / Transformer2DModel, PixArtTransformer2DModel): `(sample |
hidden_states, timestep, encoder_hidden_states=..., encoder_attention_mask=..., added_cond_kwargs=..., class_labels=...,
return_dict=...)`, and returns its output type (`.sample`, or a tuple with return_dict=False). What a text-conditioned
model takes besides the encoder states (SDXL's text_embeds and time_ids, PixArt's mask) is packed into the engines'
one `cond` input as the family's layout says (core/conditioning.py). Behind it, each sample runs through the engine of
its timestep's bucket (runtime.py). It exposes what pipelines read from a denoiser: `config` (the exported model's
diffusers config), `dtype` (float32, the engines' I/O) and `device`. A model exported with learned variance returns
eps and zeros for the variance half, which pipelines discard. Pipelines that pass no class labels (DDPMPipeline and
DDIMPipeline call `unet(image, t)`) reach class-conditional engines through labels bound once:

    pipe = diffusers.DDPMPipeline(unet=dilatequant.as_diffusers("engines", class_labels=[0, 1, 2, 3]), scheduler=...)
    images = pipe(batch_size=4).images      # one digit of each bound class
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import BaseOutput

from dilatequant.core.denoiser import SpecMixin
from dilatequant.core.errors import UserError
from dilatequant.core.families import get_family

from .engine import EngineSet
from .runtime import EngineDenoiser, load_engine_model

ClassLabels = int | Sequence[int] | torch.Tensor


@dataclass
class EngineOutput(BaseOutput):
    """What diffusers' denoisers return: `.sample`, or `[0]`."""

    sample: torch.Tensor


class DiffusersDenoiser(torch.nn.Module):
    """Any `eps = denoiser(x, t, cond)` with a `spec` (the bucketed engines; also a calibration's fake-quant model,
    to compare pipelines) behind a diffusers denoiser's interface (see the module docstring)."""

    def __init__(self, runtime: SpecMixin, class_labels: ClassLabels | None = None) -> None:  # and callable: eps = runtime(x, t, cond)
        super().__init__()
        self.runtime = runtime
        self.config = FrozenDict(runtime.spec.config)
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # follows pipe.to(device) for `device`
        bound = None if class_labels is None else self.checked_labels(class_labels)
        self.register_buffer("class_labels", bound, persistent=False)  # used when the pipeline passes none
        if "projection_class_embeddings_input_dim" in self.config:  # SDXL pipelines check their time ids' width against it
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=self.config["projection_class_embeddings_input_dim"]))

    def checked_labels(self, class_labels: ClassLabels) -> torch.Tensor:
        """Bound labels as a 1-d long tensor, refused at binding time rather than mid-pipeline."""
        num_classes = self.runtime.spec.num_classes
        if not num_classes:
            raise UserError("class_labels were bound, but this denoiser is not class-conditional: leave class_labels out.")
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.is_floating_point() or not len(labels) or labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(f"class_labels must be integer class ids in 0..{num_classes - 1} (the model's {num_classes} classes); "
                            f"got {labels.tolist()}.")  # fmt: skip
        return labels.long()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def conditioning(self, batch: int, encoder_hidden_states: torch.Tensor | None, class_labels: torch.Tensor | None,
                     encoder_attention_mask: torch.Tensor | None = None, added_cond_kwargs: dict | None = None) -> torch.Tensor | None:  # fmt: skip
        spec = self.runtime.spec
        if get_family(spec.family).cross_attention:
            if encoder_hidden_states is None:
                raise UserError("These engines are a text-conditioned denoiser: the pipeline must pass encoder_hidden_states.")
            extras = {name: value for name, value in (added_cond_kwargs or {}).items() if value is not None}
            return spec.layout.pack(encoder_hidden_states.float(), encoder_attention_mask, extras)
        if spec.num_classes:
            if class_labels is not None:  # the pipeline's own labels win over bound ones
                return class_labels.long()
            if self.class_labels is None:
                raise UserError(f"These engines are class-conditional ({spec.num_classes} classes): pass class_labels, as the "
                                "model they were exported from needs, or, for a pipeline that passes none (DDPMPipeline, "
                                "DDIMPipeline), bind them: as_diffusers(ENGINES, class_labels=...).")  # fmt: skip
            if len(self.class_labels) not in (1, batch):
                raise UserError(f"{len(self.class_labels)} class_labels are bound, but the pipeline runs a batch of {batch}: "
                                f"bind one label or {batch}, or call the pipeline with batch_size={len(self.class_labels)}.")  # fmt: skip
            return self.class_labels
        return None

    def forward(self, sample: torch.Tensor | None = None, timestep: torch.Tensor | float | int | None = None,
                encoder_hidden_states: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                added_cond_kwargs: dict | None = None, **_ignored) -> EngineOutput | tuple:  # fmt: skip
        x = sample if sample is not None else hidden_states  # UNets name it `sample`, transformers `hidden_states`
        if x is None or timestep is None:
            raise UserError("A denoiser call needs the noisy sample and its timestep.")
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(len(x)).round().long()
        cond = self.conditioning(len(x), encoder_hidden_states, class_labels, encoder_attention_mask, added_cond_kwargs)
        if cond is not None and len(cond) == 1 < len(x):
            cond = cond.expand(len(x), *cond.shape[1:])
        eps = self.runtime(x.float(), t, cond)
        out_channels = self.config.get("out_channels") or x.shape[1]
        if out_channels == 2 * x.shape[1]:  # learned variance: the engines export eps alone
            eps = torch.cat([eps, torch.zeros_like(eps)], dim=1)
        eps = eps.to(x.dtype)
        return EngineOutput(sample=eps) if return_dict else (eps,)


def as_diffusers(engines: str | Path | EngineSet, clamp: bool = False, class_labels: ClassLabels | None = None) -> DiffusersDenoiser:
    """An engine directory as a diffusers denoiser; `clamp`: timesteps outside the calibrated range use the nearest
    bucket (a pipeline run with another step count than the calibrated one needs it); `class_labels`: one label, or one
    per image, for class-conditional engines in a pipeline that passes none."""
    runtime = EngineDenoiser(engines, clamp) if isinstance(engines, EngineSet) else load_engine_model(engines, clamp).denoiser
    return DiffusersDenoiser(runtime, class_labels)
