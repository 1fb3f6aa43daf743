"""Seed-to-seed noise floor of the quality metrics: the same model, sampled with different seeds.

    python -m dilatequant.tools.noise_floor --model digits --n 1000 --seeds 0,1,2,3,4 --out floor.json

A difference between two models smaller than this spread is not a difference.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import click

from dilatequant.core.atomic import atomic_write_text
from dilatequant.core.denoiser import load_model
from dilatequant.core.environment import resolve_device
from dilatequant.core.evaluate import evaluate
from dilatequant.core.sampling import SamplerConfig

METRICS = ("fid_digits", "class_accuracy")


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def noise_floor(model: str, n: int, seeds: list[int], sampler: SamplerConfig, device: str) -> dict:
    """Evaluate once per seed; per-seed records plus mean/std/min/max of each metric."""
    torch_device = resolve_device(device)
    loaded = load_model(model, torch_device)
    runs = [evaluate(loaded, n, SamplerConfig(sampler.scheduler, sampler.steps, seed, sampler.batch_size), torch_device)
            for seed in seeds]  # fmt: skip
    return {
        "model": model, "n": n, "steps": sampler.steps, "scheduler": sampler.scheduler, "seeds": seeds,
        "device": runs[0]["device"], "summary": {m: summarise([r[m] for r in runs]) for m in METRICS}, "runs": runs,
    }  # fmt: skip


@click.command()
@click.option("--model", default="digits", show_default=True)
@click.option("--n", default=1000, show_default=True)
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="Comma-separated seeds.")
@click.option("--steps", default=50, show_default=True)
@click.option("--scheduler", default="ddim", show_default=True)
@click.option("--batch-size", default=500, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(model: str, n: int, seeds: str, steps: int, scheduler: str, batch_size: int, device: str, out: Path) -> None:
    sampler = SamplerConfig(scheduler=scheduler, steps=steps, batch_size=batch_size)
    record = noise_floor(model, n, [int(s) for s in seeds.split(",")], sampler, device)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    click.echo(json.dumps(record["summary"], indent=2))


if __name__ == "__main__":
    main()
