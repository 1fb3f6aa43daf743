"""`OUT.work/`: what a long calibration has finished, so that re-running the same command resumes.

It holds the calibration data, the initialised activation tables and one checkpoint per distilled block, each
written atomically. A key (the configuration and the source model's fingerprint) guards it: a command with other
settings is refused, not resumed.
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
INIT_FILE, INIT_STATS_FILE = "initialisation.safetensors", "initialisation.json"


class WorkDir:
    def __init__(self, out: Path, key: dict) -> None:
        self.path = Path(out).with_name(Path(out).name + ".work")
        self.key = json.dumps(key, sort_keys=True)

    def open(self) -> bool:
        """Create or reuse the directory; True when earlier progress for the same key is there. Progress made with
        other settings is refused, not resumed and not silently deleted."""
        key_file = self.path / KEY_FILE
        if key_file.is_file():
            if key_file.read_text() == self.key:
                return True
            raise ArtifactError(f"{self.path} holds the progress of a calibration with other settings "
                                f"({differences(json.loads(key_file.read_text()), json.loads(self.key))}); it is not "
                                "resumed under these. Re-run with the settings it was made with, or delete it to start afresh.")  # fmt: skip
        if self.path.exists() and any(self.path.iterdir()):
            raise ArtifactError(f"{self.path} exists but is not a dilatequant work directory; refusing to delete it. "
                                "Move it away or choose another --out.")  # fmt: skip
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(key_file, self.key)
        return False

    def describe(self) -> str:
        """What earlier runs finished here, for the 'resuming' line."""
        blocks = len(list(self.path.glob("block-*.safetensors")))
        parts = ["calibration data" if (self.path / DATA_FILE).is_file() else None,
                 "the activation tables' initialisation" if (self.path / INIT_FILE).is_file() else None,
                 f"{blocks} distilled block checkpoint(s)" if blocks else None,
                 "the group-size search's state" if (self.path / "group_search.json").is_file() else None]  # fmt: skip
        return ", ".join(p for p in parts if p) or "nothing finished yet"

    def load_data(self) -> CalibrationData | None:
        path = self.path / DATA_FILE
        return CalibrationData.load(path) if path.is_file() else None

    def save_data(self, data: CalibrationData) -> None:
        atomic_write_bytes(self.path / DATA_FILE, data.to_bytes())

    def load_initialisation(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """The range statistics and activation tables a finished initialisation saved, or None."""
        tables, stats = self.path / INIT_FILE, self.path / INIT_STATS_FILE
        if not (tables.is_file() and stats.is_file()):
            return None
        return json.loads(stats.read_text()), load(tables.read_bytes())

    def save_initialisation(self, statistics: dict, tables: dict[str, torch.Tensor]) -> None:
        atomic_write_bytes(self.path / INIT_FILE, save({k: v.detach().cpu().contiguous() for k, v in tables.items()}))
        atomic_write_text(self.path / INIT_STATS_FILE, json.dumps(statistics))

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


def differences(made: dict, wanted: dict) -> str:
    """'bits: W8A8 here, W4A8 now; source model differs' — the settings two work-dir keys disagree on."""
    old, new = made.get("config", {}), wanted.get("config", {})
    changed = [f"{k}: {old.get(k)} then, {new.get(k)} now" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if made.get("source") != wanted.get("source"):
        changed.append("another source model")
    return "; ".join(changed[:4]) + ("; ..." if len(changed) > 4 else "")
