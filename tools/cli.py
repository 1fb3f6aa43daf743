"""The `dilatequant` command line. Arguments become config objects here and nowhere else."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Callable

import click

from .errors import UserError

MODEL_HELP = "Bundled model name (digits) or a local diffusers model/pipeline directory. Offline: no hub ids."


class Group(click.Group):
    """Turns user errors into one clean line on stderr and exit status 1, with no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from exc


def sampler_options(command: Callable) -> Callable:
    """The options shared by every command that samples, folded into a SamplerConfig and a device."""

    @click.option("--steps", default=50, show_default=True, help="Sampling steps.")
    @click.option("--scheduler", default="ddim", show_default=True, type=click.Choice(["ddim", "ddpm", "dpm-solver++"]))
    @click.option("--seed", default=0, show_default=True, help="Seed of the initial noise.")
    @click.option("--batch-size", type=int, default=None, help="Samples per denoiser call [default: 32 on CPU, 500 on CUDA].")
    @click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
    @functools.wraps(command)
    def wrapper(steps: int, scheduler: str, seed: int, batch_size: int | None, device: str, **kwargs):
        from .environment import resolve_device
        from .sampling import SamplerConfig, default_batch_size

        torch_device = resolve_device(device)
        batch_size = batch_size or default_batch_size(torch_device)
        config = SamplerConfig(scheduler=scheduler, steps=steps, seed=seed, batch_size=batch_size)
        return command(sampler=config, device=torch_device, **kwargs)

    return wrapper


@click.group(cls=Group)
@click.version_option(package_name="dilatequant")
def cli() -> None:
    """dilatequant: calibrate, export and deploy low-bit diffusion denoisers (offline; models are local)."""


@cli.command("sample")
@click.option("--model", default="digits", show_default=True, help=MODEL_HELP)
@click.option("--n", default=64, show_default=True, help="Number of samples (classes cycle 0..9).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG grid to write.")
@sampler_options
def sample_command(model: str, n: int, out: Path, sampler, device) -> None:
    """Sample a model and write a PNG grid labelled by class."""
    from .denoiser import load_model
    from .evaluate import labels_for
    from .grid import save_grid
    from .sampling import sample

    loaded = load_model(model, device)
    labels = labels_for(loaded, n)
    start = time.perf_counter()
    images = sample(loaded.denoiser, loaded.scheduler_config, labels, sampler, device)
    save_grid(images, labels, out)
    click.echo(f"wrote {out} ({n} samples, {sampler.steps} {sampler.scheduler} steps, {time.perf_counter() - start:.1f} s)")


@cli.command("eval")
@click.option("--model", default="digits", show_default=True, help=MODEL_HELP)
@click.option("--n", default=1000, show_default=True, help="Number of samples.")
@click.option("--ref", default=None, help="Reference model for psnr_vs_ref (same noise); " + MODEL_HELP)
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path), help="JSON file to write.")
@sampler_options
def eval_command(model: str, n: int, ref: str | None, out: Path | None, sampler, device) -> None:
    """Sample n images and report fid_digits, class_accuracy and psnr_vs_ref as JSON."""
    from .atomic import atomic_write_text
    from .denoiser import load_model
    from .evaluate import evaluate

    loaded = load_model(model, device)
    reference = load_model(ref, device) if ref else None
    text = json.dumps(evaluate(loaded, n, sampler, device, reference), indent=2) + "\n"
    if out is not None:
        atomic_write_text(out, text)
    click.echo(text, nl=False)


@cli.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_command(path: str, as_json: bool) -> None:
    """Say what a model directory (or a bundled model name) holds; non-zero exit if malformed."""
    from .inspection import format_summary, inspect_model

    summary = inspect_model(path)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


def main() -> None:
    cli()
