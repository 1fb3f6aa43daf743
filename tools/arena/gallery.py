"""The images an arena shows: for every variant, one image per item of a fixed pool, generated ahead of voters.

Item i is (class label i mod classes, initial noise i of the seed), identical for every variant (core.sampling
draws noise from (seed, index) alone), so a match compares the variants on the same condition and noise. Images
are PNGs cached under the gallery folder by the variant's file digest and the sampler settings, written atomically
with a provenance.json last: a folder with its provenance is complete and is reused, never regenerated.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dilatequant.core.atomic import atomic_write_bytes, atomic_write_text
from dilatequant.core.denoiser import resolve_model_dir
from dilatequant.core.errors import UserError
from dilatequant.core.manifest import file_table
from dilatequant.core.metrics import DigitsMetrics
from dilatequant.core.sampling import SamplerConfig, balanced_labels, sample

from ..grid import to_uint8
from ..variants import load_variant, variant_kind

PROVENANCE = "provenance.json"
ITEMS = 40  # images per variant by default: 4 per digit class
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


@dataclass(frozen=True)
class ArenaVariant:
    name: str
    spec: str
    kind: str  # model | calibration | engines (the variant loader's kinds)
    sha256: str  # of every file the variant is loaded from


def directory_digest(directory: Path) -> str:
    """sha256 over every file's path and sha256 (the artifacts' file table; hidden lock/staging files excluded)."""
    table = {path: entry["sha256"] for path, entry in file_table(directory).items() if not any(part.startswith(".") for part in path.split("/"))}
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def parse_variant(text: str) -> ArenaVariant:
    """NAME=PATH (a bundled model name, model, calibration or engine directory) → the variant with its digest."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise UserError(f"--variant takes NAME=PATH (e.g. fp=digits or w8a8=out/calib), got '{text}'.")
    if not NAME.match(name):
        raise UserError(f"Variant name '{name}' must be 1-40 letters, digits, '-', '_' or '.'.")
    kind = variant_kind(spec)
    directory = Path(spec) if kind != "model" else resolve_model_dir(spec)
    return ArenaVariant(name, spec, kind, directory_digest(directory))


@dataclass(frozen=True)
class Item:
    index: int
    label: int | None  # class id, None for an unconditional model
    prompt: str  # what the voter is told the images show


class Gallery:
    """`items` images per variant under `root`; `ensure` generates the missing ones, `path` and `pixels` read them."""

    def __init__(self, root: str | Path, items: int, sampler: SamplerConfig, device: torch.device, clamp: bool = False) -> None:
        if items < 1:
            raise UserError(f"--images must be >= 1 (got {items}).")
        self.root, self.items, self.sampler, self.device, self.clamp = Path(root), items, sampler, device, clamp
        self.folders: dict[str, Path] = {}
        self.pool: list[Item] = []
        self.shape: tuple[int, ...] = ()  # of every variant's samples, set by ensure

    def folder(self, variant: ArenaVariant) -> Path:
        s = self.sampler
        return self.root / f"{variant.sha256[:16]}-{s.scheduler}{s.steps}-seed{s.seed}-n{self.items}"

    def ensure(self, variants: list[ArenaVariant], progress=print) -> None:
        """Generate (or reuse) every variant's images; all variants must sample the same shape and labels."""
        records = {}
        for variant in variants:
            folder = self.folders[variant.name] = self.folder(variant)
            if (folder / PROVENANCE).is_file():
                records[variant.name] = json.loads((folder / PROVENANCE).read_text())
                progress(f"arena: {variant.name}: {self.items} images cached in {folder}")
            else:
                records[variant.name] = self._generate(variant, folder, progress)
        first, *others = records.items()
        for name, record in others:
            if (record["shape"], record["labels"]) != (first[1]["shape"], first[1]["labels"]):
                raise UserError(f"Variants must sample the same images to be compared: {first[0]} gives shape "
                                f"{first[1]['shape']} with {first[1]['classes']} classes, {name} {record['shape']} with {record['classes']}.")  # fmt: skip
        self.shape = tuple(first[1]["shape"])
        self.pool = [self._item(i, label if first[1]["classes"] else None) for i, label in enumerate(first[1]["labels"])]

    def _item(self, index: int, label: int | None) -> Item:
        if label is None:
            return Item(index, None, f"unconditional sample #{index}")
        noun = "the digit" if DigitsMetrics.applies_to(self.shape) else "class"
        return Item(index, label, f"{noun} {label}")

    def _generate(self, variant: ArenaVariant, folder: Path, progress) -> dict:
        progress(f"arena: {variant.name}: generating {self.items} images ({variant.kind} {variant.spec})")
        start = time.perf_counter()
        with load_variant(variant.spec, self.device, kind=variant.kind, clamp=self.clamp,
                          assume_schedule=self.sampler.assume_schedule) as loaded_variant:
            loaded = loaded_variant.loaded
            classes = loaded.denoiser.num_classes
            labels = balanced_labels(self.items, min(10, classes or 10))
            images = sample(loaded.denoiser, loaded.scheduler_config, labels, self.sampler, self.device)
        for index, pixels in enumerate(to_uint8(images)):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            atomic_write_bytes(folder / f"{index:05d}.png", buffer.getvalue())
        record = {"variant": variant.name, "spec": variant.spec, "kind": variant.kind, "sha256": variant.sha256,
                  "sampler": asdict(self.sampler), "items": self.items, "labels": labels.tolist(), "classes": classes,
                  "shape": list(loaded.denoiser.sample_shape), "seconds": round(time.perf_counter() - start, 2), "created": time.time()}  # fmt: skip
        atomic_write_text(folder / PROVENANCE, json.dumps(record, indent=1))  # last: marks the folder complete
        return record

    def path(self, variant: str, item: int) -> Path:
        return self.folders[variant] / f"{item:05d}.png"

    def pixels(self, variant: str, item: int) -> np.ndarray:
        """The image as shown (uint8, HxW or HxWxC): what a metric judge scores."""
        return np.asarray(Image.open(self.path(variant, item)))
