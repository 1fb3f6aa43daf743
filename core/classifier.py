"""The small CNN that judges generated digits: its logits give class_accuracy, its penultimate features fid_digits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ModelLoadError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class DigitsClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4) and a 64-d feature layer; input 1x32x32 in [-1, 1]."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * 4 * 4, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, the space fid_digits is measured in."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def save_pretrained(self, directory: str | Path, extra_config: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, **self.config, **(extra_config or {})}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DigitsClassifier:
        directory = Path(directory)
        try:
            config = json.loads((directory / CONFIG_NAME).read_text())
            state = load_file(str(directory / WEIGHTS_NAME))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"Cannot read the digits classifier from {directory}: {exc}. "
                f"Expected {CONFIG_NAME} and {WEIGHTS_NAME} there; reinstall dilatequant or retrain it with "
                "`python -m dilatequant.tools.train_classifier --out DIR`."
            ) from exc
        model = cls(config["width"], config["feature_dim"], config["num_classes"])
        model.load_state_dict(state)
        return model.eval()
