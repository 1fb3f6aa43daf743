"""`dilatequant profile`: latency of engine directories, measured side by side in one process.

For each batch size: every bucket engine of every directory is warmed up, then timed in rounds — each round
runs every bucket of every directory once, in a rotating directory order — so a slow moment of the machine
hits all of them alike. Reported per directory and batch: p50/p95 over all timed calls and per bucket,
sampling time per image for the full step loop (diffusers scheduler included), and peak RSS (measured in a
fresh process). With baselines, `ratio_p50` = p50 / baseline p50 per batch size.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dilatequant.core.environment import library_versions
from dilatequant.core.errors import UserError
from dilatequant.core.sampling import SamplerConfig, balanced_labels, sample

from .engine import load
from .memory import measure_in_subprocess
from .runtime import EngineDenoiser


@dataclass(frozen=True)
class ProfileConfig:
    batches: tuple[int, ...] = (1, 8)
    warmup: int = 5
    runs: int = 30
    sampling_steps: int = 25
    sampling_repeats: int = 3
    scheduler: str = "ddim"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise UserError(f"--batch takes positive batch sizes, got {self.batches}.")
        if self.runs < 30:
            raise UserError(f"--runs must be >= 30 for stable percentiles, got {self.runs}.")


def bucket_feeds(denoiser: EngineDenoiser, bucket: int, batch: int, seed: int) -> tuple[np.ndarray, ...]:
    """Inputs for one bucket: noise, a timestep inside both the bucket and the calibrated range, labels."""
    low, high = denoiser.engines.table.ranges()[bucket]
    t = (max(low, denoiser.low) + min(high, denoiser.high)) // 2
    x = torch.randn(batch, *denoiser.sample_shape, generator=torch.Generator().manual_seed(seed)).numpy()
    cond = denoiser.conditioning(balanced_labels(batch, denoiser.num_classes or 10), denoiser.timed_tokens)
    return x, np.full(batch, t, dtype=np.int64), cond.numpy() if cond is not None else None


def time_buckets(denoisers: dict[str, EngineDenoiser], batch: int, config: ProfileConfig) -> dict[str, list[list[float]]]:
    """name -> per bucket, the seconds of each timed call."""
    feeds = {name: [bucket_feeds(d, k, batch, config.seed) for k in range(len(d.engines))] for name, d in denoisers.items()}
    for name, denoiser in denoisers.items():
        for k, inputs in enumerate(feeds[name]):
            for _ in range(config.warmup):
                denoiser.engines.run(k, *inputs)
    seconds = {name: [[] for _ in feeds[name]] for name in denoisers}
    names = list(denoisers)
    for round_index in range(config.runs):
        rotation = round_index % len(names)
        for name in names[rotation:] + names[:rotation]:
            for k, inputs in enumerate(feeds[name]):
                start = time.perf_counter()
                denoisers[name].engines.run(k, *inputs)
                seconds[name][k].append(time.perf_counter() - start)
    return seconds


def time_sampling(denoisers: dict[str, EngineDenoiser], batch: int, config: ProfileConfig) -> dict[str, float]:
    """name -> median seconds per image of the full sampling loop for one batch, interleaved repeats."""
    sampler = SamplerConfig(scheduler=config.scheduler, steps=config.sampling_steps, seed=config.seed, batch_size=batch)
    per_image: dict[str, list[float]] = {name: [] for name in denoisers}
    for _ in range(config.sampling_repeats):
        for name, denoiser in denoisers.items():
            labels = balanced_labels(batch, denoiser.num_classes or 10)
            scheduler_config = denoiser.engines.manifest["model"]["scheduler_config"]
            start = time.perf_counter()
            sample(denoiser, scheduler_config, labels, sampler, progress=False)
            per_image[name].append((time.perf_counter() - start) / batch)
    return {name: float(np.median(values)) for name, values in per_image.items()}


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    values = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(values, 50)), 3), "p95_ms": round(float(np.percentile(values, 95)), 3)}


def unique_names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def profile(engines: Path, baselines: list[Path], config: ProfileConfig, progress=print) -> dict:
    """Profile `engines` and the baselines in one process; returns the profile.json content."""
    paths = [Path(engines), *map(Path, baselines)]
    names = unique_names(paths)
    denoisers = {name: EngineDenoiser(load(path)) for name, path in zip(names, paths)}
    results = {name: {"path": str(path), **summary(denoisers[name]), "batches": {}} for name, path in zip(names, paths)}
    for batch in config.batches:
        progress(f"batch {batch}: {config.runs} timed rounds over {sum(len(d.engines) for d in denoisers.values())} engines")
        seconds = time_buckets(denoisers, batch, config)
        sampling = time_sampling(denoisers, batch, config)
        for name in names:
            pooled = [s for bucket in seconds[name] for s in bucket]
            results[name]["batches"][str(batch)] = {**percentiles_ms(pooled), "per_bucket": [percentiles_ms(b) for b in seconds[name]],
                                                    "sampling_seconds_per_image": round(sampling[name], 4)}  # fmt: skip
    for denoiser in denoisers.values():  # released before the memory runs, which load each engine set alone
        denoiser.close()
    for name, path in zip(names, paths):
        progress(f"peak memory of {name}")
        results[name]["memory"] = measure_in_subprocess(path, max(config.batches))
    comparisons = [compare(results, names[0], baseline) for baseline in names[1:]]
    return {"kind": "profile", "settings": asdict(config), "engines": results, "comparisons": comparisons, "versions": library_versions()}


def summary(denoiser: EngineDenoiser) -> dict:
    manifest = denoiser.engines.manifest
    keys = ("backend", "backend_version", "device", "profile", "precision")
    build = manifest["build"]
    return {**{key: manifest[key] for key in keys}, "n_buckets": len(denoiser.engines), "threads": build["threads"],
            "streams": build.get("streams", 1)}  # fmt: skip


def compare(results: dict, name: str, baseline: str) -> dict:
    """Latency ratios of `name` to `baseline` per batch size (< 1: faster than the baseline)."""
    mine, theirs = results[name]["batches"], results[baseline]["batches"]
    return {"engines": name, "baseline": baseline,
            "ratio_p50": {b: round(mine[b]["p50_ms"] / theirs[b]["p50_ms"], 3) for b in mine},
            "ratio_sampling": {b: round(mine[b]["sampling_seconds_per_image"] / theirs[b]["sampling_seconds_per_image"], 3) for b in mine}}  # fmt: skip


def markdown_table(report: dict) -> str:
    """One row per engine directory and batch size; ratio columns for each baseline."""
    ratios: dict[tuple[str, str], list[str]] = {}
    for c in report["comparisons"]:
        for batch, ratio in c["ratio_p50"].items():
            ratios.setdefault((c["engines"], batch), []).append(f"{ratio:.2f}x {c['baseline']}")
    lines = ["| engines | backend | graphs | buckets | batch | p50 ms | p95 ms | sampling s/image | p50 vs baseline | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, entry in report["engines"].items():
        for batch, row in entry["batches"].items():
            lines.append(f"| {name} | {entry['backend']} | {entry['profile']}/{entry['precision']} | {entry['n_buckets']} | {batch} | "
                         f"{row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['sampling_seconds_per_image']:.3f} | "
                         f"{'; '.join(ratios.get((name, batch), []))} | {entry['memory']['peak_rss_mb']:.0f} |")  # fmt: skip
    machines = sorted({f"{e['device']}, {e['backend']} {e['backend_version']}" for e in report["engines"].values()})
    return "\n".join(lines + [f"measured on: {'; '.join(machines)}"])


def chart(report: dict, path: Path) -> None:
    """A PNG bar chart of p50 latency per batch size and engine directory."""
    from dilatequant.core.plots import require_matplotlib, save_figure

    plt = require_matplotlib()
    names = list(report["engines"])
    batches = list(next(iter(report["engines"].values()))["batches"])
    figure, axis = plt.subplots(figsize=(1.8 + 1.6 * len(batches) * len(names) / 2, 3.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [report["engines"][name]["batches"][b]["p50_ms"] for b in batches]
        bars = axis.bar(np.arange(len(batches)) + i * width, values, width, label=name)
        axis.bar_label(bars, fmt="%.1f", fontsize=7)
    axis.set_xticks(np.arange(len(batches)) + width * (len(names) - 1) / 2, [f"batch {b}" for b in batches])
    axis.set_ylabel("p50 latency per call (ms)")
    axis.legend(fontsize=7)
    save_figure(figure, path)
