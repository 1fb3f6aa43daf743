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
CALIB_HELP = "Calibration artifact directory: run its fake-quant model (--model, if given, must be its source)."


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


def model_options(command: Callable) -> Callable:
    """--model / --calib, resolved into (the model to run, its artifact or None)."""

    @click.option("--model", default=None, help=MODEL_HELP + "  [default: digits]")
    @click.option("--calib", default=None, type=click.Path(path_type=Path), help=CALIB_HELP)
    @functools.wraps(command)
    def wrapper(model: str | None, calib: Path | None, device, **kwargs):
        from .denoiser import load_model

        if calib is None:
            return command(loaded=load_model(model or "digits", device), artifact=None, device=device, **kwargs)
        from dilatequant.calibrate.artifact import load_artifact

        artifact = load_artifact(calib, device)
        if model is not None:
            artifact.check_source(model)
        return command(loaded=artifact.model, artifact=artifact, device=device, **kwargs)

    return wrapper


@click.group(cls=Group)
@click.version_option(package_name="dilatequant")
def cli() -> None:
    """dilatequant: calibrate, export and deploy low-bit diffusion denoisers (offline; models are local)."""


@cli.command("sample")
@click.option("--n", default=64, show_default=True, help="Number of samples (classes cycle 0..9).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG grid to write.")
@sampler_options
@model_options
def sample_command(loaded, artifact, n: int, out: Path, sampler, device) -> None:
    """Sample a model (or a calibrated fake-quant model) and write a PNG grid labelled by class."""
    from .evaluate import labels_for
    from .grid import save_grid
    from .sampling import sample

    labels = labels_for(loaded, n)
    start = time.perf_counter()
    images = sample(loaded.denoiser, loaded.scheduler_config, labels, sampler, device)
    save_grid(images, labels, out)
    click.echo(f"wrote {out} ({n} samples, {sampler.steps} {sampler.scheduler} steps, {time.perf_counter() - start:.1f} s)")


@cli.command("eval")
@click.option("--n", default=1000, show_default=True, help="Number of samples.")
@click.option("--ref", default=None, help="Reference for psnr_vs_ref (same noise) [default with --calib: its FP source]. "
              + MODEL_HELP)  # fmt: skip
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path), help="JSON file to write.")
@sampler_options
@model_options
def eval_command(loaded, artifact, n: int, ref: str | None, out: Path | None, sampler, device) -> None:
    """Sample n images and report fid_digits, class_accuracy and psnr_vs_ref as JSON."""
    from .atomic import atomic_write_text
    from .denoiser import load_model
    from .evaluate import evaluate

    if ref is None and artifact is not None:
        ref = artifact.record.source["spec"]
        artifact.check_source(ref)
    reference = load_model(ref, device) if ref else None
    text = json.dumps(evaluate(loaded, n, sampler, device, reference), indent=2) + "\n"
    if out is not None:
        atomic_write_text(out, text)
    click.echo(text, nl=False)


@cli.command("calibrate")
@click.option("--model", default="digits", show_default=True, help=MODEL_HELP)
@click.option("--bits", default="W8A8", show_default=True, type=click.Choice(["W8A8", "W6A6", "W4A8", "W4A4"]))
@click.option("--method", default="dilatequant", show_default=True, type=click.Choice(["dilatequant", "minmax"]),
              help="dilatequant: MSE-initialised tables + block-wise distillation; minmax: min/max tables only.")
@click.option("--no-dilation", is_flag=True, help="Skip weight dilation.")
@click.option("--no-tpq", is_flag=True, help="One shared activation scale for all timesteps instead of one per timestep.")
@click.option("--bkd-iters", default=None, type=int, help="Distillation iterations per block [default: 0 for minmax].")
@click.option("--samples", default=1024, show_default=True, help="Calibration samples (x_t, t) drawn from trajectories.")
@click.option("--trajectories", default=64, show_default=True, help="FP sampling trajectories recorded.")
@click.option("--timestep-sampling", default="random", show_default=True, type=click.Choice(["random", "uniform"]))
@click.option("--act-init", default="mse", show_default=True, type=click.Choice(["minmax", "percentile", "mse"]))
@click.option("--weight-init", default="minmax", show_default=True, type=click.Choice(["minmax", "mse"]))
@click.option("--boundary", default="8bit", show_default=True, type=click.Choice(["8bit", "fp"]),
              help="conv_in, conv_out and time embeddings: 8-bit or kept in FP.")  # fmt: skip
@click.option("--quantize-attention", is_flag=True, help="Also quantize the attention matmul inputs (q, k, softmax, v).")
@click.option("--asymmetric", is_flag=True, help="Asymmetric uint8 activations (CPU-only targets; TensorRT needs symmetric).")
@click.option("--steps", default=50, show_default=True, help="Sampler steps: the timestep grid that is calibrated.")
@click.option("--scheduler", default="ddim", show_default=True, type=click.Choice(["ddim", "ddpm", "dpm-solver++"]))
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Artifact directory to write.")
def calibrate_command(model: str, bits: str, method: str, no_dilation: bool, no_tpq: bool, bkd_iters: int | None,
                      samples: int, trajectories: int, timestep_sampling: str, act_init: str, weight_init: str,
                      boundary: str, quantize_attention: bool, asymmetric: bool, steps: int, scheduler: str, seed: int, device: str, out: Path) -> None:  # fmt: skip
    """Calibrate a model (DilateQuant or min/max) and write the calibration artifact."""
    from dilatequant.calibrate.config import DEFAULT_BKD_ITERS, CalibConfig
    from dilatequant.calibrate.flow import calibrate

    from .environment import resolve_device

    if bkd_iters is None:
        bkd_iters = DEFAULT_BKD_ITERS if method == "dilatequant" else 0
    config = CalibConfig.from_bits(
        bits, method=method, dilation=not no_dilation, tpq=not no_tpq, bkd_iters=bkd_iters, samples=samples,
        trajectories=trajectories, timestep_sampling=timestep_sampling, act_init=act_init, weight_init=weight_init,
        boundary=boundary, quantize_attention=quantize_attention, act_symmetric=not asymmetric, steps=steps, scheduler=scheduler, seed=seed,
    )  # fmt: skip
    start = time.perf_counter()
    path = calibrate(model, config, out, resolve_device(device))
    click.echo(f"wrote {path} ({config.bits_name}, {config.method}, {time.perf_counter() - start:.1f} s)")


@cli.command("export")
@click.option("--calib", required=True, type=click.Path(path_type=Path), help="Calibration artifact directory.")
@click.option("--buckets", default="4", show_default=True, help="Number of timestep buckets, or 'auto'.")
@click.option("--profile", default="tensorrt", show_default=True, type=click.Choice(["tensorrt", "ort-cpu"]))
@click.option("--fp32", is_flag=True, help="tensorrt profile: keep the non-quantized parts in FP32 instead of FP16 "
              "(ort-cpu graphs are always FP32).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Export directory to write.")
def export_command(calib: Path, buckets: str, profile: str, fp32: bool, out: Path) -> None:
    """Export a calibration artifact to one Q/DQ ONNX graph per timestep bucket."""
    from dilatequant.export.config import ExportConfig
    from dilatequant.export.flow import export

    if buckets != "auto" and not buckets.isdigit():
        raise UserError(f"--buckets takes a positive count or 'auto', got '{buckets}'.")
    config = ExportConfig(buckets=buckets if buckets == "auto" else int(buckets), profile=profile, fp32=fp32)
    start = time.perf_counter()
    path = export(calib, config, out)
    click.echo(f"wrote {path} ({profile}, {time.perf_counter() - start:.1f} s)")


@cli.command("lint")
@click.argument("graph", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--profile", default="tensorrt", show_default=True, type=click.Choice(["tensorrt", "ort-cpu"]))
@click.option("--allow-residual-add", is_flag=True, help="tensorrt: also accept Q/DQ on residual Add inputs.")
@click.option("--min-fused", default=0.95, show_default=True, help="ort-cpu: fail below this share of fused integer kernels.")
def lint_command(graph: Path, profile: str, allow_residual_add: bool, min_fused: float) -> None:
    """Check a Q/DQ graph against a profile's rules; non-zero exit on any violation."""
    import onnx

    from dilatequant.export.lint import lint_tensorrt, ort_fusion

    if profile == "tensorrt":
        violations = lint_tensorrt(onnx.load(str(graph)), allow_residual_add)
        for violation in violations:
            click.echo(str(violation))
        click.echo(f"{graph}: {len(violations)} violation(s) of the tensorrt profile")
        if violations:
            raise SystemExit(1)
        return
    report = ort_fusion(graph)
    click.echo(json.dumps(report, indent=2))
    if report["fused_share"] < min_fused:
        raise click.ClickException(f"only {report['fused_share']:.0%} of the quantized Conv/MatMul/Gemm became integer "
                                   f"kernels (target {min_fused:.0%}); left in float: {', '.join(report['left_in_float'][:10])}")  # fmt: skip


@cli.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_command(path: str, as_json: bool) -> None:
    """Say what a model directory, bundled model or calibration artifact holds; non-zero exit if malformed."""
    from .inspection import format_summary, inspect_path

    summary = inspect_path(path)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
