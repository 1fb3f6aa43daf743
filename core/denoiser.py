"""Load a denoiser from the zoo or a local diffusers directory and call all three families the same way.

Supported families: UNet2DModel (DDPM-style, optionally class-conditional), UNet2DConditionModel
(Stable-Diffusion-style, cross-attention) and DiT (DiTTransformer2DModel / Transformer2DModel).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .conditioning import CondLayout, standin
from .errors import ModelLoadError
from .families import family_of_class, get_family
from .finite import require_finite
from .manifest import sha256_file
from .zoo import ZOO, zoo_path

if TYPE_CHECKING:
    from .pipelines import PromptTable

# Without a text encoder (offline, no hub) a cross-attention model is conditioned on seeded random
# encoder states, one fixed tensor per class id: a structural stand-in, the same in every run.
COND_TOKENS = 8
COND_SEED = 1000
VAE_SCALE = 8  # latent -> pixel size of the stand-in's size conditioning (Stable Diffusion's and PixArt's VAEs)
DEFAULT_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
WEIGHT_PATTERNS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")  # diffusers' names, shards and variants
EXPECTED_LAYOUT = (
    "a diffusers model directory (config.json + weights, e.g. diffusion_pytorch_model.safetensors) "
    "or a pipeline directory (model_index.json with unet/ or transformer/, and scheduler/)"
)


@dataclass(frozen=True)
class ModelSpec:
    """What sampling needs to know about a denoiser besides calling it: its family and diffusers config.
    Plain data, so engine directories carry it and sample without the torch model."""

    family: str
    config: dict

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.config["sample_size"]
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.config["in_channels"], height, width)

    @property
    def num_classes(self) -> int | None:
        """Number of class labels the model is conditioned on (None: unconditional or cross-attention)."""
        return get_family(self.family).num_classes(self.config)

    @property
    def layout(self) -> CondLayout:
        return get_family(self.family).layout(self.config)

    def conditioning(self, labels: torch.Tensor, tokens: int = COND_TOKENS) -> torch.Tensor | None:
        """Per-sample conditioning for class ids `labels`: class labels, or for cross-attention seeded stand-in encoder
        states of `tokens` tokens per id (core/prompts.py encodes real prompts)."""
        family = get_family(self.family)
        if family.cross_attention:
            pixels = tuple(VAE_SCALE * side for side in self.sample_shape[1:])
            return torch.stack([standin(self.layout, tokens, self.config[family.states_dim_key], pixels,
                                        torch.Generator().manual_seed(COND_SEED + int(label))) for label in labels])  # fmt: skip
        return labels if self.num_classes else None

    def to_dict(self) -> dict:
        return {"family": self.family, "config": self.config}


class SpecMixin:
    """What samplers need besides the call, read from `self.spec` (torch denoisers and engines alike). With `prompts`
    (a text encoder's conditioning rows, core/pipelines.py) labels are prompt indices."""

    spec: ModelSpec
    prompts: PromptTable | None = None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.spec.sample_shape

    @property
    def num_classes(self) -> int | None:
        return self.spec.num_classes

    def conditioning(self, labels: torch.Tensor, tokens: int = COND_TOKENS) -> torch.Tensor | None:
        """Prompts' rows (their encoder's token count), else the spec's stand-ins of `tokens` tokens."""
        return self.prompts.conditioning(labels) if self.prompts is not None else self.spec.conditioning(labels, tokens)


class Denoiser(SpecMixin, nn.Module):
    """`eps = denoiser(x, t, cond)` for every family; `cond` comes from `conditioning(labels)`."""

    def __init__(self, model: nn.Module, family: str) -> None:
        super().__init__()
        self.model, self.family = model, family
        self.spec = ModelSpec(family, json.loads(json.dumps(dict(model.config), default=str)))

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return get_family(self.family).call(self.model, x, t, cond)


@dataclass
class LoadedModel:
    denoiser: Denoiser
    scheduler_config: dict
    model_dir: Path
    source: str  # the zoo name or the path as given


def resolve_model_dir(spec: str | Path) -> Path:
    """The directory holding the denoiser's config.json, for a zoo name or a local path."""
    if str(spec) in ZOO:
        return zoo_path(str(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"Model '{spec}' is neither a bundled model ({', '.join(sorted(ZOO))}) nor an existing local path. "
            f"dilatequant works offline and never downloads from a model hub: download the model elsewhere and "
            f"pass its local directory, {EXPECTED_LAYOUT}."
        )
    if not path.is_dir():
        raise ModelLoadError(f"Model path {path} is a file; expected {EXPECTED_LAYOUT}.")
    if (path / "config.json").is_file():
        return path
    for sub in ("unet", "transformer"):
        if (path / "model_index.json").is_file() and (path / sub / "config.json").is_file():
            return path / sub
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise ModelLoadError(f"No config.json in {path} (found: {found}); expected {EXPECTED_LAYOUT}.")


def read_model_config(model_dir: Path) -> dict:
    """config.json of a model directory, checked to be a supported family."""
    config_file = model_dir / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot read {config_file}: {exc}. Expected a diffusers config.json.") from exc
    family_of_class(config.get("_class_name") if isinstance(config, dict) else None, str(config_file))
    return config


def scheduler_config_file(model_dir: Path) -> Path | None:
    """The scheduler config saved with the model: beside its weights (a plain folder), in model/scheduler/, or in a
    pipeline's scheduler/."""
    for config_file in (model_dir / "scheduler_config.json", model_dir / "scheduler" / "scheduler_config.json",
                        model_dir.parent / "scheduler" / "scheduler_config.json"):  # fmt: skip
        if config_file.is_file():
            return config_file
    return None


def find_scheduler_config(model_dir: Path, assume_schedule: bool = False) -> dict:
    """The model's noise schedule. A missing one is an error naming what to add, unless `assume_schedule` (the
    CLI's explicit --scheduler) accepts the default DDPM schedule."""
    config_file = scheduler_config_file(model_dir)
    if config_file is not None:
        try:
            return json.loads(config_file.read_text())
        except ValueError as exc:
            raise ModelLoadError(f"Cannot parse {config_file}: {exc}.") from exc
    if not assume_schedule:
        raise ModelLoadError(
            f"No scheduler config for {model_dir}: the noise schedule the model was trained with decides every timestep. "
            f"Save it beside the weights (`scheduler.save_pretrained('{model_dir}')` writes scheduler_config.json) or in "
            f"a scheduler/ folder there; or, where the command takes --scheduler, name one to use the default DDPM "
            f"schedule {DEFAULT_SCHEDULER_CONFIG}."
        )
    warnings.warn(f"No scheduler config for {model_dir}; sampling on the default DDPM schedule {DEFAULT_SCHEDULER_CONFIG} "
                  "as --scheduler asks.", stacklevel=2)  # fmt: skip
    return dict(DEFAULT_SCHEDULER_CONFIG)


def weight_files(model_dir: Path) -> list[Path]:
    """The denoiser's own weight files (diffusers' names), not every *.safetensors that shares its folder."""
    return sorted({path for pattern in WEIGHT_PATTERNS for path in model_dir.glob(pattern)})


def load_model(spec: str | Path, device: str | torch.device = "cpu", assume_schedule: bool = False) -> LoadedModel:
    """Load a denoiser in float32 (eval mode) with its scheduler config, from the zoo or a local directory;
    `assume_schedule`: a model without a scheduler config samples on the default DDPM schedule."""
    import diffusers

    model_dir = resolve_model_dir(spec)
    class_name = read_model_config(model_dir)["_class_name"]
    scheduler_config = find_scheduler_config(model_dir, assume_schedule)  # before minutes of loading
    try:
        model = getattr(diffusers, class_name).from_pretrained(
            model_dir, torch_dtype=torch.float32, local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"Cannot load the {class_name} weights in {model_dir}: {exc}") from exc
    require_finite(model.state_dict(), f"Model '{spec}'", "Its weights are corrupt: re-save or retrain it "
                   "(`dilatequant inspect` lists every such tensor).")  # fmt: skip
    denoiser = Denoiser(model, family_of_class(class_name).name).to(device).eval()
    return LoadedModel(denoiser, scheduler_config, model_dir, str(spec))


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model's config.json and weight files: identifies the exact source of a calibration."""
    digest = hashlib.sha256()
    for path in sorted([model_dir / "config.json", *weight_files(model_dir)]):
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()
