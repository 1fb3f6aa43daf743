"""Resident memory of an engine directory: load it (or its first K buckets), run every bucket once, and report
the process's peak and current RSS. Runs in a fresh process so nothing else is counted:

    python -m dilatequant.engines.memory ENGINES [--batch 8] [--buckets K]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

STATUS = Path("/proc/self/status")


def rss_mb() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident set size of this process, in MiB (Linux)."""
    values = {}
    for line in STATUS.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(value.split()[0]) / 1024
    return {"rss_mb": round(values["VmRSS"], 1), "peak_rss_mb": round(values["VmHWM"], 1)}


def measure_in_subprocess(path: Path, batch: int, buckets: int | None = None) -> dict:
    """The memory report of `path`, measured by a fresh Python process."""
    command = [sys.executable, "-m", "dilatequant.engines.memory", str(path), "--batch", str(batch)]
    if buckets is not None:
        command += ["--buckets", str(buckets)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {path} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--batch", default=8, show_default=True)
@click.option("--buckets", default=None, type=int, help="Load only the first K buckets [default: all].")
def main(path: Path, batch: int, buckets: int | None) -> None:
    from .engine import load
    from .profile import bucket_feeds
    from .runtime import EngineDenoiser

    before = rss_mb()
    engines = load(path)
    if buckets is not None:
        engines.engines = engines.engines[:buckets]
    denoiser = EngineDenoiser(engines)
    for k in range(len(engines)):  # profile's inputs: what a timed call would hold
        engines.run(k, *bucket_feeds(denoiser, k, batch, seed=0))
    after = rss_mb()
    report = {"path": str(path), "batch": batch, "buckets_loaded": len(engines), "baseline_rss_mb": before["rss_mb"], **after}
    click.echo(json.dumps(report))


if __name__ == "__main__":
    main()
