"""Tiny random-weight models of the three supported families, saved the way users keep them on disk.

Seeded, a few thousand parameters each: every stage is tested on all three families in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}

# family -> (diffusers class, config, pipeline subfolder or None for a plain model directory)
TINY_CONFIGS: dict[str, tuple[str, dict, str | None]] = {
    # DDPM-style class-conditional UNet: convs, self-attention, down/up sampling.
    "unet": ("UNet2DModel", dict(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=10,
    ), None),
    # SD-like: cross-attention on encoder states, GroupNorm, 4 latent channels.
    "unet-cond": ("UNet2DConditionModel", dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    ), "unet"),
    # Class-conditional DiT: patch embedding, adaLN-Zero, learned-variance output.
    "dit": ("DiTTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ), "transformer"),
}  # fmt: skip


# The shape family of the model on which ONNX Runtime's u8s8 kernels drifted (issue 11: 3 channels, 4 classes,
# 2 layers per block, 32 norm groups, attention at two resolutions), at 16x16 and half its widths (64, 128, 192).
RGB_UNET = ("UNet2DModel", dict(
    sample_size=16, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32, attention_head_dim=32,
    num_class_embeds=4,
), None)  # fmt: skip


def build_tiny_model(family: str, root: Path) -> Path:
    """Save a seeded tiny model of `family` under `root` (model dir, or pipeline layout) with a DDPM scheduler."""
    return build_model(TINY_CONFIGS[family], root)


def build_model(spec: tuple[str, dict, str | None], root: Path) -> Path:
    """Save a seeded model (diffusers class, config, pipeline subfolder or None) with a DDPM scheduler."""
    import diffusers

    class_name, config, subfolder = spec
    torch.manual_seed(0)
    model = getattr(diffusers, class_name)(**config)
    model.save_pretrained(root / subfolder if subfolder else root, safe_serialization=True)
    diffusers.DDPMScheduler(**SCHEDULER).save_pretrained(root / "scheduler")
    if subfolder:
        index = {"_class_name": "DiffusionPipeline", subfolder: ["diffusers", class_name],
                 "scheduler": ["diffusers", "DDPMScheduler"]}  # fmt: skip
        (root / "model_index.json").write_text(json.dumps(index))
    return root
