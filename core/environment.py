"""What ran where: devices and library versions, recorded in every result and manifest."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # torch is imported where a device is made: manifests and contracts are read without it
    import torch

RECORDED_PACKAGES = ("dilatequant", "torch", "diffusers", "numpy")


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cuda' without a GPU is a UserError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but this torch build sees no CUDA GPU. Use --device cpu.")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"Unknown device '{name}'; use cpu, cuda, cuda:N or auto.")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """A human-readable device name: the GPU model, or the CPU with its thread count."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
