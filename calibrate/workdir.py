"""`OUT.work/`: what a long calibration has finished, so that re-running the same command resumes.

It holds the calibration data and one checkpoint per distilled block, each written atomically. A key
(the configuration and the source model's fingerprint) guards it: a different command starts afresh.
The directory is removed once the artifact is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load, save

from dilatequant.core.atomic import atomic_write_bytes, atomic_write_text
from dilatequant.core.manifest import ArtifactError

from .calib_data import CalibrationData

KEY_FILE = "key.json"
DATA_FILE = "calibration_data.safetensors"


class WorkDir:
    def __init__(self, out: Path, key: dict) -> None:
        self.path = Path(out).with_name(Path(out).name + ".work")
        self.key = json.dumps(key, sort_keys=True)

    def open(self) -> bool:
        """Create or reuse the directory; True when earlier progress for the same key is there."""
        key_file = self.path / KEY_FILE
        if key_file.is_file() and key_file.read_text() == self.key:
            return True
        if self.path.exists() and not key_file.is_file() and any(self.path.iterdir()):
            raise ArtifactError(f"{self.path} exists but is not a dilatequant work directory; refusing to delete it. "
                                "Move it away or choose another --out.")  # fmt: skip
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        atomic_write_text(key_file, self.key)
        return False

    def load_data(self) -> CalibrationData | None:
        path = self.path / DATA_FILE
        return CalibrationData.load(path) if path.is_file() else None

    def save_data(self, data: CalibrationData) -> None:
        atomic_write_bytes(self.path / DATA_FILE, data.to_bytes())

    def block_file(self, index: int, name: str) -> Path:
        return self.path / f"block-{index:03d}-{hashlib.sha1(name.encode()).hexdigest()[:8]}.safetensors"

    def load_block(self, index: int, name: str) -> dict[str, torch.Tensor] | None:
        path = self.block_file(index, name)
        return load(path.read_bytes()) if path.is_file() else None

    def save_block(self, index: int, name: str, state: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
        atomic_write_bytes(self.block_file(index, name), save(tensors))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
