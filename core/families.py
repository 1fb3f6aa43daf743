"""The model-family registry: for each supported diffusers denoiser, how it is called and conditioned, and where
its structure (boundary layers, dilation fold sites, distillation blocks) comes from.

Everything that differs between UNet2DModel, UNet2DConditionModel and DiT is an entry here; the rest of the
toolchain asks `get_family(name)` instead of testing names or types. A new family is a new entry (and, for a new
architecture, the structure functions that find its layers: core/structure.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .conditioning import CondLayout
from .errors import ModelLoadError
from .structure import DIFFUSERS_BOUNDARY, distillation_blocks, dit_feature_site, fold_sites, unet_feature_site

Call = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def call_unet(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    return model(x, t, class_labels=cond).sample


SDXL_TIME_IDS = 6  # SDXL's (original size, crop top-left, target size); the refiner's 5 are not supported


def plain_layout(config: dict) -> CondLayout:
    return CondLayout()


def unet_cond_layout(config: dict) -> CondLayout:
    """SDXL-style UNets add the pooled text embedding and the size/crop ids to the time embedding."""
    if config.get("addition_embed_type") != "text_time":
        return CondLayout()
    time_ids = SDXL_TIME_IDS * config["addition_time_embed_dim"]
    return CondLayout(extras=(("text_embeds", config["projection_class_embeddings_input_dim"] - time_ids), ("time_ids", SDXL_TIME_IDS)))


def pixart_layout(config: dict) -> CondLayout:
    """PixArt attends to T5 states under their padding mask; at 1024 px it also embeds resolution and aspect ratio."""
    sizes = config.get("use_additional_conditions")
    sizes = config.get("sample_size") == 128 if sizes is None else sizes  # diffusers' default rule
    return CondLayout(mask=True, extras=(("resolution", 2), ("aspect_ratio", 1)) if sizes else ())


def eps_only(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Models with learned variance predict (eps, variance) along channels; samplers use eps."""
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def call_unet_cond(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    states, _, extras = unet_cond_layout(model.config).unpack(cond)
    return model(x, t, encoder_hidden_states=states, added_cond_kwargs=extras or None).sample


def call_dit(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    return eps_only(model(x, timestep=t, class_labels=cond).sample, x)


def call_pixart(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    states, mask, extras = pixart_layout(model.config).unpack(cond)
    sizes = extras or {"resolution": None, "aspect_ratio": None}
    return eps_only(model(x, encoder_hidden_states=states, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=sizes).sample, x)


@dataclass(frozen=True)
class Family:
    name: str
    class_names: tuple[str, ...]  # config.json `_class_name`s of this family
    call: Call  # eps = call(model, x, t, cond)
    num_classes_key: str | None  # config key holding the number of class labels (None: not class-conditioned)
    cross_attention: bool  # conditioned on encoder states: a text encoder's (--prompts), or seeded stand-ins per class id
    boundary_patterns: tuple[str, ...]  # layer-name patterns of the boundary layers (kept 8-bit or FP)
    feature_site: Callable[[nn.Module], str]  # the module whose input is the middle feature map (TDAC)
    fold_sites: Callable[[nn.Module], dict] = fold_sites  # where dilation's 1/s folds exactly
    blocks: Callable[[nn.Module], list[str]] = distillation_blocks  # the blocks of block-wise distillation
    layout: Callable[[dict], CondLayout] = plain_layout  # how `cond` packs what the model takes besides x, t
    states_dim_key: str = "cross_attention_dim"  # config key of the encoder states' width (cross-attention families)

    def num_classes(self, config: dict) -> int | None:
        return config.get(self.num_classes_key) if self.num_classes_key else None


FAMILIES = {
    "unet": Family("unet", ("UNet2DModel",), call_unet, "num_class_embeds", False, DIFFUSERS_BOUNDARY, unet_feature_site),
    "unet-cond": Family("unet-cond", ("UNet2DConditionModel",), call_unet_cond, None, True, DIFFUSERS_BOUNDARY, unet_feature_site,
                        layout=unet_cond_layout),
    "dit": Family("dit", ("DiTTransformer2DModel", "Transformer2DModel"), call_dit, "num_embeds_ada_norm", False, DIFFUSERS_BOUNDARY,
                  dit_feature_site),
    "pixart": Family("pixart", ("PixArtTransformer2DModel",), call_pixart, None, True, DIFFUSERS_BOUNDARY, dit_feature_site,
                     layout=pixart_layout, states_dim_key="caption_channels"),
}
CLASS_NAMES = {class_name: family for family in FAMILIES.values() for class_name in family.class_names}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ModelLoadError(f"Unknown model family '{name}'; families: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_of_class(class_name: str | None, where: str = "the model's config.json") -> Family:
    """The family of a diffusers class name, or ModelLoadError naming the supported classes."""
    if class_name not in CLASS_NAMES:
        raise ModelLoadError(f"{where} describes a '{class_name}', which dilatequant does not support. "
                             f"Supported denoisers: {', '.join(CLASS_NAMES)}.")  # fmt: skip
    return CLASS_NAMES[class_name]
