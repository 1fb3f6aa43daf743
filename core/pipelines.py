"""Text-to-image pipeline directories as users have them (`model_index.json` with text encoder(s), tokenizer(s),
unet or transformer, scheduler, vae): their own text encoders turn prompts into the conditioning rows the denoiser
takes (packed as core/conditioning.py says), and their VAE turns latents into images.

    table = encode_prompts(pipeline_dir, ["a red car", ...], negative_prompt="")
    denoiser.prompts = table            # label i -> prompt i; table.negative_label -> the negative prompt

How each pipeline class encodes is a registry entry (`ENCODERS`); the pipeline's `encode_prompt` does the work, so
truncation, padding, CLIP skip, SDXL's two encoders and zeroed empty negatives are the pipeline's own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .conditioning import CondLayout, size_extras
from .denoiser import VAE_SCALE
from .errors import ModelLoadError, UserError
from .families import family_of_class
from .optional import require

# pipeline components that prompt encoding never needs (skipped when loading: the denoiser and VAE are the big ones)
DENOISER_AND_DECODER = ("unet", "transformer", "vae", "safety_checker", "feature_extractor", "image_encoder")


@dataclass
class PromptTable:
    """Conditioning rows of `prompts` and of `negative_prompt` (the last row), as the pipeline at `pipeline` encoded
    them; labels index the rows. Stored with the calibration data (its rows a tensor there, the rest `metadata()`)."""

    prompts: list[str]
    negative_prompt: str
    rows: torch.Tensor  # (len(prompts) + 1, tokens, width)
    pipeline: str

    @property
    def negative_label(self) -> int:
        return len(self.prompts)

    def labels(self, n: int) -> torch.Tensor:
        """Prompt indices 0, 1, ..., P-1, 0, 1, ... for n samples."""
        return torch.arange(n) % len(self.prompts)

    def conditioning(self, labels: torch.Tensor) -> torch.Tensor:
        return self.rows[labels.long().cpu()]

    def same_prompts(self, prompts: list[str], negative_prompt: str) -> bool:
        return self.prompts == list(prompts) and self.negative_prompt == negative_prompt

    def metadata(self) -> dict[str, str]:
        return {"prompts": json.dumps({"prompts": self.prompts, "negative_prompt": self.negative_prompt, "pipeline": self.pipeline})}

    @classmethod
    def from_tensors(cls, rows: torch.Tensor, metadata: dict[str, str]) -> PromptTable:
        record = json.loads(metadata["prompts"])
        return cls(record["prompts"], record["negative_prompt"], rows, record["pipeline"])


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a text file."""
    try:
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read the prompts file {path}: {exc}. Give a UTF-8 text file, one prompt per line.") from exc
    if not prompts:
        raise UserError(f"The prompts file {path} holds no prompt; write one prompt per line.")
    return prompts


def pipeline_dir_of(model_dir: Path) -> Path | None:
    """The pipeline directory a denoiser directory belongs to (its parent with model_index.json), if any."""
    for candidate in (model_dir, model_dir.parent):
        if (candidate / "model_index.json").is_file():
            return candidate
    return None


def pipeline_class(pipeline_dir: Path) -> str:
    try:
        return json.loads((pipeline_dir / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Cannot read the pipeline class from {pipeline_dir / 'model_index.json'}: {exc}.") from exc


Encoder = Callable[[object, list[str], str, CondLayout, dict], tuple[torch.Tensor, torch.Tensor]]


def encode_sd(pipe, prompts: list[str], negative: str, layout: CondLayout, sizes: dict) -> tuple[torch.Tensor, torch.Tensor]:
    states, negatives = pipe.encode_prompt(prompts, "cpu", 1, True, [negative] * len(prompts))
    return states, negatives[:1]


def encode_sdxl(pipe, prompts: list[str], negative: str, layout: CondLayout, sizes: dict) -> tuple[torch.Tensor, torch.Tensor]:
    states, negatives, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                                    do_classifier_free_guidance=True,
                                                                    negative_prompt=[negative] * len(prompts))  # fmt: skip
    time_ids = sizes["time_ids"][None]
    return (layout.pack(states, None, {"text_embeds": pooled, "time_ids": time_ids.expand(len(states), -1)}),
            layout.pack(negatives[:1], None, {"text_embeds": negative_pooled[:1], "time_ids": time_ids}))  # fmt: skip


def encode_pixart(pipe, prompts: list[str], negative: str, layout: CondLayout, sizes: dict) -> tuple[torch.Tensor, torch.Tensor]:
    states, mask, negatives, negative_mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt=negative,
                                                                device="cpu")  # fmt: skip
    extras = lambda n: {name: sizes[name][None].expand(n, -1) for name, _ in layout.extras}  # noqa: E731
    return layout.pack(states, mask, extras(len(states))), layout.pack(negatives[:1], negative_mask[:1], extras(1))


# pipeline class -> how its text encoder(s) encode (the pipeline's own encode_prompt behind each)
ENCODERS: dict[str, Encoder] = {
    "StableDiffusionPipeline": encode_sd,
    "StableDiffusionXLPipeline": encode_sdxl,
    "PixArtAlphaPipeline": encode_pixart,
    "PixArtSigmaPipeline": encode_pixart,
}
DENOISER_FOLDERS = {"StableDiffusionPipeline": "unet", "StableDiffusionXLPipeline": "unet", "PixArtAlphaPipeline": "transformer",
                    "PixArtSigmaPipeline": "transformer"}  # fmt: skip


@torch.no_grad()
def encode_prompts(pipeline_dir: Path, prompts: list[str], negative_prompt: str = "") -> PromptTable:
    """The conditioning rows of `prompts` and `negative_prompt`, from the pipeline's own text encoder(s) (float32, CPU)."""
    import diffusers

    require("transformers", "Encoding prompts with a pipeline's text encoders", "text")
    class_name = pipeline_class(pipeline_dir)
    if class_name not in ENCODERS:
        raise ModelLoadError(f"{pipeline_dir} is a {class_name}; --prompts supports {', '.join(ENCODERS)} pipelines.")
    skipped = {name: None for name in DENOISER_AND_DECODER if (pipeline_dir / name).is_dir()}
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True, **skipped)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"Cannot load the text encoder(s) of the pipeline in {pipeline_dir}: {exc}") from exc
    config = json.loads((pipeline_dir / DENOISER_FOLDERS[class_name] / "config.json").read_text())
    layout = family_of_class(config.get("_class_name")).layout(config)
    states, negative = ENCODERS[class_name](pipe, list(prompts), negative_prompt, layout, size_extras(*latent_pixels(pipeline_dir, config)))
    return PromptTable(list(prompts), negative_prompt, torch.cat([states, negative]).float().cpu(), str(pipeline_dir))


def vae_scale(pipeline_dir: Path) -> int:
    """Pixels per latent along a side: 2^(VAE blocks - 1), as diffusers pipelines compute it."""
    config = json.loads((pipeline_dir / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def latent_pixels(pipeline_dir: Path, denoiser_config: dict) -> tuple[int, int]:
    size = denoiser_config["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    scale = vae_scale(pipeline_dir) if (pipeline_dir / "vae" / "config.json").is_file() else VAE_SCALE
    return height * scale, width * scale


@torch.no_grad()
def decode_latents(pipeline_dir: Path, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Images in [-1, 1] from the denoiser's latents, through the pipeline's VAE (scaled by its scaling factor)."""
    import diffusers

    try:
        vae = diffusers.AutoencoderKL.from_pretrained(pipeline_dir / "vae", local_files_only=True).float().eval()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot load the VAE of the pipeline in {pipeline_dir}: {exc}") from exc
    scaling = vae.config.scaling_factor
    images = [vae.decode(batch / scaling).sample.clamp(-1, 1) for batch in latents.split(batch_size)]
    return torch.cat(images)

