"""Paired images in two steps, for runs where one side is costly (e.g. engines under an emulated CPU):

    python -m dilatequant.tools.paired_images sample VARIANT --n 16 --steps 50 --out a.pt
    python -m dilatequant.tools.paired_images compare a.pt b.pt

`sample` draws n images (DDIM, seed 0: initial noise depends only on seed and index) from a model, a
calibration artifact (its fake-quant model) or an engine directory and saves them with their settings;
`compare` prints the paired PSNR of two such files (same settings required) as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dilatequant.core.metrics import psnr_vs_ref
from dilatequant.core.sampling import SamplerConfig, balanced_labels, sample

from .variants import load_variant


def sample_variant(variant: str, n: int, steps: int, out: Path) -> None:
    loaded = load_variant(variant).loaded
    labels = balanced_labels(n, loaded.denoiser.num_classes or 10)
    images = sample(loaded.denoiser, loaded.scheduler_config, labels, SamplerConfig(steps=steps, batch_size=n))
    torch.save({"images": images, "settings": {"n": n, "steps": steps, "seed": 0, "scheduler": "ddim"}, "variant": variant}, out)


def compare(a: Path, b: Path) -> dict:
    first, second = torch.load(a), torch.load(b)
    if first["settings"] != second["settings"]:
        raise SystemExit(f"{a} and {b} were sampled with different settings: {first['settings']} vs {second['settings']}")
    return {"a": first["variant"], "b": second["variant"], **first["settings"], "psnr_db": psnr_vs_ref(first["images"], second["images"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sampler = commands.add_parser("sample")
    sampler.add_argument("variant")
    sampler.add_argument("--n", type=int, default=16)
    sampler.add_argument("--steps", type=int, default=50)
    sampler.add_argument("--out", type=Path, required=True)
    comparer = commands.add_parser("compare")
    comparer.add_argument("a", type=Path)
    comparer.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.command == "sample":
        sample_variant(args.variant, args.n, args.steps, args.out)
    else:
        print(json.dumps(compare(args.a, args.b), indent=2))


if __name__ == "__main__":
    main()
