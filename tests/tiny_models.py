"""Tiny random-weight models of the three supported families, saved the way users keep them on disk.

Seeded, a few thousand parameters each: every stage is tested on all three families in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}


def _save_scheduler(directory: Path) -> None:
    from diffusers import DDPMScheduler

    DDPMScheduler(**SCHEDULER).save_pretrained(directory / "scheduler")


def _as_pipeline(root: Path, model, subfolder: str) -> Path:
    """Save `model` in a diffusers pipeline layout (model_index.json, <subfolder>/, scheduler/)."""
    model.save_pretrained(root / subfolder, safe_serialization=True)
    _save_scheduler(root)
    index = {"_class_name": "DiffusionPipeline", subfolder: ["diffusers", type(model).__name__],
             "scheduler": ["diffusers", "DDPMScheduler"]}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def tiny_unet(root: Path) -> Path:
    """DDPM-style class-conditional UNet2DModel (conv, attention), as a model directory with scheduler/."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=10,
    )  # fmt: skip
    model.save_pretrained(root, safe_serialization=True)
    _save_scheduler(root)
    return root


def tiny_unet_cond(root: Path) -> Path:
    """SD-like UNet2DConditionModel: cross-attention, GroupNorm, down/up sampling, 4 latent channels; pipeline layout."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip
    return _as_pipeline(root, model, "unet")


def tiny_dit(root: Path) -> Path:
    """Class-conditional DiT (patch embedding, adaLN-Zero, learned variance output); pipeline layout."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )  # fmt: skip
    return _as_pipeline(root, model, "transformer")


FAMILY_BUILDERS = {"unet": tiny_unet, "unet-cond": tiny_unet_cond, "dit": tiny_dit}
