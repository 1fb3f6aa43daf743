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
    # PixArt-like: adaLN-single DiT blocks with cross-attention to (masked) T5 states, learned sigma.
    "pixart": ("PixArtTransformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, caption_channels=32, norm_num_groups=4,
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


def tiny_tokenizer(root: Path, max_length: int):
    """A CLIP BPE tokenizer over single printable characters (no merges): real tokenization, a 190-entry vocabulary."""
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in map(chr, range(33, 127)):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=max_length)


def tiny_clip(tokenizer, hidden: int, projection: bool = False):
    import transformers

    config = transformers.CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
                                         num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, projection_dim=hidden)  # fmt: skip
    return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(config)


def tiny_vae():
    import diffusers

    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                                   norm_num_groups=4, sample_size=32)  # fmt: skip


SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)  # fmt: skip
UNET_COND = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 norm_num_groups=4, attention_head_dim=4)  # fmt: skip


def build_tiny_pipeline(kind: str, root: Path) -> Path:
    """Save a seeded tiny text-to-image pipeline (`sd`, `sdxl` or `pixart`) the way diffusers saves one, in `root`."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    vae, scheduler = tiny_vae(), diffusers.DDIMScheduler(**SD_SCHEDULER)
    tokenizer = tiny_tokenizer(root.parent / f"{root.name}-vocab", 12)
    if kind == "sd":
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=tiny_clip(tokenizer, 16), tokenizer=tokenizer, scheduler=scheduler,
                                                 unet=diffusers.UNet2DConditionModel(**UNET_COND, cross_attention_dim=16),
                                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    elif kind == "sdxl":  # two text encoders (16 + 16 wide states), pooled 16-wide text_embeds and 6 time ids of 8
        unet = diffusers.UNet2DConditionModel(**UNET_COND, cross_attention_dim=32, addition_embed_type="text_time",
                                              addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)  # fmt: skip
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=tiny_clip(tokenizer, 16), text_encoder_2=tiny_clip(tokenizer, 16, True),
                                                   tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)  # fmt: skip
    elif kind == "pixart":  # T5 states under a padding mask, adaLN-single DiT blocks with cross-attention, learned sigma
        t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                                               num_heads=2, pad_token_id=1, eos_token_id=1))  # fmt: skip
        transformer = diffusers.PixArtTransformer2DModel(**TINY_CONFIGS["pixart"][1])
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=vae, transformer=transformer, scheduler=scheduler)
    else:
        raise ValueError(f"unknown tiny pipeline {kind}")
    pipe.save_pretrained(root)
    return root
