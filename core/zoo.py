"""The bundled models, found by name. Everything is local: dilatequant never reaches a model hub."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError

ASSETS = Path(__file__).parent / "assets"
# Zoo name -> directory under assets/, in diffusers' own format.
ZOO: dict[str, str] = {"digits": "digits", "digits-dit": "digits-dit"}
CLASSIFIER_DIR = ASSETS / "digits_classifier"


def zoo_path(name: str) -> Path:
    """The directory of a bundled model; an unknown name or a damaged install is a ModelLoadError."""
    if name not in ZOO:
        raise ModelLoadError(f"No bundled model named '{name}'. Bundled models: {', '.join(sorted(ZOO))}.")
    path = ASSETS / ZOO[name]
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"The bundled model '{name}' is missing from {path} (damaged install?). Reinstall dilatequant."
        )
    return path
