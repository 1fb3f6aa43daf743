"""The `dilatequant` command line. Arguments become config objects here and nowhere else."""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import click

from dilatequant.calibrate.config import (
    ACT_INITS,
    BIT_PRESETS,
    BOUNDARY,
    INPUT_MIXING,
    LR_SCHEDULES,
    OFFLOAD_CHOICES,
    RECON_LOSSES,
    SOFTMAX_QUANTIZERS,
    TIMESTEP_SAMPLING,
    WEIGHT_INITS,
    WEIGHT_ROUNDING,
    CalibConfig,
)
from dilatequant.calibrate.recipes import METHODS, RECIPES
from dilatequant.core.errors import UserError
from dilatequant.core.output import check_writable_file
from dilatequant.core.pipelines import ENCODERS, pipeline_class, read_prompts
from dilatequant.core.sampling import SCHEDULERS
from dilatequant.core.zoo import ZOO
from dilatequant.engines.config import BACKENDS, FIDELITY_MODES, INTEGER_KERNELS, BuildConfig
from dilatequant.export.config import SCALE_SOURCES, ExportConfig
from dilatequant.export.profiles import PROFILES

from .arena.cli import arena
from .demo import DemoConfig
from .options import Group, sampler_options

MODEL_HELP = f"Bundled model name ({' or '.join(ZOO)}) or a local diffusers model/pipeline directory. Offline: no hub ids."
CALIB_HELP = "Calibration artifact directory: run its fake-quant model (--model, if given, must be its source)."
ENGINES_HELP = "Engine directory (dilatequant build): sample through its engines, one per timestep bucket."


def model_options(command: Callable) -> Callable:
    """--model / --calib / --engines, resolved into (the model to run, its calibration artifact or None); with
    --prompts, the model is given them (labels are then prompt indices)."""

    @click.option("--model", default=None, help=MODEL_HELP + "  [default: digits]")
    @click.option("--calib", default=None, type=click.Path(path_type=Path), help=CALIB_HELP)
    @click.option("--engines", default=None, type=click.Path(path_type=Path), help=ENGINES_HELP)
    @click.option("--clamp", is_flag=True, help="With --engines: run timesteps outside the calibrated range with the nearest bucket.")
    @click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
                  help="Text file, one prompt per line: a text-to-image pipeline's images of these prompts (cycled), "
                       "decoded by its VAE.")  # fmt: skip
    @click.option("--negative-prompt", default="", help="With --prompts: the prompt guidance steers away from.")
    @click.option("--pipeline", default=None, type=click.Path(file_okay=False, path_type=Path),
                  help="With --prompts: the pipeline whose text encoder and VAE to use [default: the one the model came from].")
    @functools.wraps(command)
    def wrapper(model: str | None, calib: Path | None, engines: Path | None, clamp: bool, prompts_file: Path | None,
                negative_prompt: str, pipeline: Path | None, device, sampler, **kwargs):  # fmt: skip
        from .variants import load_variant, pipeline_of, prompt_table

        if engines is not None and (calib is not None or model is not None):
            raise UserError("--engines runs an engine directory on its own; drop --model/--calib (use --ref for a reference).")
        if engines is not None:
            variant = load_variant(engines, device, kind="engines", clamp=clamp)
        elif calib is not None:
            variant = load_variant(calib, device, kind="calibration", source=model)
        else:
            variant = load_variant(model or "digits", device, kind="model", assume_schedule=sampler.assume_schedule)
        with variant:
            if prompts_file is not None:
                variant.loaded.denoiser.prompts = prompt_table(variant, read_prompts(prompts_file), negative_prompt, pipeline)
            elif pipeline is not None or negative_prompt:
                raise UserError("--negative-prompt and --pipeline apply to prompted sampling; add --prompts FILE.")
            elif variant.loaded.denoiser.prompts is None and (source := pipeline_of(variant)) and pipeline_class(source) in ENCODERS:
                warnings.warn(f"{variant.spec} comes from the text-to-image pipeline {source}: without --prompts it runs on "
                              "seeded stand-in encoder states, not text. Pass --prompts FILE for images of prompts.", stacklevel=2)  # fmt: skip
            return command(loaded=variant.loaded, artifact=variant.artifact, device=device, sampler=sampler, **kwargs)

    return wrapper


@click.group(cls=Group)
@click.version_option(package_name="dilatequant")
def cli() -> None:
    """dilatequant: calibrate, export and deploy low-bit diffusion denoisers (offline; models are local)."""


@cli.command("sample")
@click.option("--n", default=64, show_default=True, type=click.IntRange(min=1), help="Number of samples (classes cycle 0..9, or the prompts).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG grid to write.")
@sampler_options
@model_options
def sample_command(loaded, artifact, n: int, out: Path, sampler, device) -> None:
    """Sample a model (or a calibrated fake-quant model, or engines) and write a PNG grid labelled by class or prompt."""
    from dilatequant.core.evaluate import generate, labels_for

    from .grid import save_grid

    check_writable_file(out)
    labels = labels_for(loaded, n)
    start = time.perf_counter()
    images = generate(loaded, labels, sampler, device)
    prompts = loaded.denoiser.prompts
    save_grid(images, labels, out, captions=[prompts.prompts[i] for i in labels.tolist()] if prompts else None)
    click.echo(f"wrote {out} ({n} samples, {sampler.steps} {sampler.scheduler} steps, {time.perf_counter() - start:.1f} s)")


@cli.command("eval")
@click.option("--n", default=1000, show_default=True, type=click.IntRange(min=1), help="Number of samples.")
@click.option("--ref", default=None, help="Reference for psnr_vs_ref and lpips_vs_ref (same noise) [default with --calib: its FP source]: "
              "an engine directory, a calibration artifact (its fake-quant model), or " + MODEL_HELP)  # fmt: skip
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path), help="JSON file to write.")
@sampler_options
@model_options
def eval_command(loaded, artifact, n: int, ref: str | None, out: Path | None, sampler, device) -> None:
    """Sample n images and report fid_digits, class_accuracy, psnr_vs_ref and lpips_vs_ref as JSON."""
    from dilatequant.core.evaluate import evaluate

    from .variants import load_variant

    if out is not None:
        check_writable_file(out)  # before sampling, not after it
    if ref is None and artifact is not None:
        ref = artifact.record.source["spec"]
        artifact.check_source(ref)
    reference = load_variant(ref, device, assume_schedule=sampler.assume_schedule).loaded if ref else None
    if reference is not None:  # the same prompts, encoded once: a paired comparison
        reference.denoiser.prompts = loaded.denoiser.prompts
    result = evaluate(loaded, n, sampler, device, reference)
    text = json.dumps(result, indent=2) + "\n"
    click.echo(text, nl=False)  # first: a late write failure must not lose the results
    if "metrics_skipped" in result:
        paired = "psnr_vs_ref compares it with the reference" + (", as does lpips_vs_ref." if "lpips_vs_ref" in result else ".")
        click.echo(f"Note: no bundled quality metric for this model ({result['metrics_skipped']}); "
                   + (paired if ref else "pass --ref MODEL for a paired PSNR and LPIPS."), err=True)
    if "lpips_skipped" in result:
        click.echo(f"Note: no lpips_vs_ref: {result['lpips_skipped']}", err=True)
    if out is not None:
        write_result(out, text)


def write_result(path: Path, text: str) -> None:
    """Write a result file whose content was already printed; a failure says where the results still are."""
    from dilatequant.core.atomic import atomic_write_text

    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise UserError(f"Could not write {path} ({exc.strerror or exc}); the results are printed above.") from None


def calib_option(name: str, field: str, **kwargs) -> Callable:
    """An option for a CalibConfig field: unset (None) unless given, so CalibConfig (or the recipe) supplies the
    default and the CLI and the Python API cannot disagree; --help shows CalibConfig's default."""
    default = CalibConfig.__dataclass_fields__[field].default
    shown = "the method's" if default is None else default
    return click.option(name, field, default=None, help=f"{kwargs.pop('help', '')}  [default: {shown}]".strip(), **kwargs)


@cli.command("calibrate")
@click.option("--model", default="digits", show_default=True, help=MODEL_HELP)
@click.option("--recipe", "recipe_name", default=None, type=click.Choice(list(RECIPES)),
              help="Start from a named recipe (calibrate/recipes.py, e.g. demo-quick); the options given override it.")
@click.option("--bits", default="W8A8", show_default=True, type=click.Choice(BIT_PRESETS))
@calib_option("--method", "method", type=click.Choice(METHODS),
              help="dilatequant: MSE-initialised tables + block-wise distillation; minmax: min/max tables only; eda-dm: "
              "TDAC, one shared range, FBR with QDrop and learned rounding; repquant: post-norm inputs reparameterised, one table, "
              "reconstruction; q-dit: group-wise Linear weights, dynamic Linear inputs.")
@click.option("--dilation/--no-dilation", "dilation", default=None, help="Weight dilation.  [default: the method's]")
@click.option("--reparameterise/--no-reparameterise", "reparameterise", default=None,
              help="RepQuant: calibrate post-norm inputs per channel and fold them into one per-tensor grid.  [default: the method's]")
@calib_option("--reparam-iters", "reparam_iters", type=int, help="--reparameterise: iterations learning each input's clipping bounds.")
@click.option("--tpq/--no-tpq", "tpq", default=None,
              help="One activation scale per timestep, or one shared by all.  [default: the method's]")
@calib_option("--bkd-iters", "bkd_iters", type=int, help="Distillation iterations per block (dilatequant "
              f"{RECIPES['dilatequant'].settings['bkd_iters']}, minmax 0, eda-dm {RECIPES['eda-dm'].settings['bkd_iters']}).")
@calib_option("--bkd-batch", "bkd_batch", type=int, help="Distillation batch size.")
@calib_option("--bkd-lr-weight", "bkd_lr_weight", type=float, help="trained-weights: learning rate of the weights.")
@calib_option("--bkd-lr-step", "bkd_lr_step", type=float, help="Learning rate of the quantizer steps, relative to each step's size.")
@calib_option("--bkd-lr-schedule", "bkd_lr_schedule", type=click.Choice(LR_SCHEDULES),
              help="Distillation learning rates: constant, or cosine (annealed to 0).")
@click.option("--cuda-graph/--no-cuda-graph", "bkd_cuda_graph", default=None,
              help="On a GPU, replay each block's distillation step as a CUDA graph.  [default: on]")
@calib_option("--bkd-offload", "bkd_offload", type=click.Choice(OFFLOAD_CHOICES),
              help="Distillation keeps both models' blocks in host memory and one on the device at a time (for models the "
              "GPU cannot hold twice; same results, slower); auto: when the two models would fill over half the GPU.")
@calib_option("--samples", "samples", type=int, help="Calibration samples (x_t, t) drawn from trajectories.")
@calib_option("--trajectories", "trajectories", type=int, help="FP sampling trajectories recorded.")
@click.option("--data-selection", "--timestep-sampling", "timestep_sampling", default=None, type=click.Choice(TIMESTEP_SAMPLING),
              help="Which recorded (x_t, t) pairs calibrate: random, uniform (the same count per timestep) or tdac "
              "(EDA-DM: per-timestep counts from feature density and diversity).  [default: the method's]")
@calib_option("--tdac-radius", "tdac_radius", type=float, help="tdac: MSE radius of the density count.")
@calib_option("--tdac-lambda", "tdac_lambda", type=float, help="tdac: weight of diversity against density.")
@calib_option("--act-init", "act_init", type=click.Choice(ACT_INITS), help="Activation table initialisation.")
@calib_option("--weight-init", "weight_init", type=click.Choice(WEIGHT_INITS))
@calib_option("--boundary", "boundary", type=click.Choice(BOUNDARY), help="conv_in, conv_out and time embeddings: 8-bit or kept in FP.")
@click.option("--quantize-attention", is_flag=True, help="Also quantize the attention matmul inputs (q, k, softmax, v).")
@calib_option("--softmax-quantizer", "softmax_quantizer", type=click.Choice(SOFTMAX_QUANTIZERS),
              help="With --quantize-attention: the softmax output's quantizer (log-sqrt2 is exact in torch but deploys as a uniform table).")
@click.option("--head-tables", "attention_head_tables", is_flag=True,
              help="With --quantize-attention: one table entry per (timestep, attention head) for those inputs.")
@calib_option("--group-size", "weight_group_size", type=click.IntRange(min=0),
              help="Linear weights in groups of this many input channels (Q-DiT); 0: per output channel.")
@click.option("--dynamic-activations/--static-activations", "act_dynamic", default=None,
              help="Quantize Linear inputs per token and group at run time (Q-DiT), or from calibrated tables.  [default: the method's]")
@click.option("--symmetric-groups/--asymmetric-groups", "weight_group_symmetric", default=None,
              help="Group-wise weights with zero point 0 (TensorRT's block quantization) or with a zero point per group "
                   "(ONNX Runtime's MatMulNBits).  [default: asymmetric]")
@click.option("--group-search/--no-group-search", "group_search", default=None,
              help="Search each Linear input group's group size (Q-DiT; mean at least --group-size).  [default: off]")
@calib_option("--group-choices", "group_choices", type=str, help="Comma-separated group sizes the search may give a layer.")
@calib_option("--search-generations", "search_generations", type=int, help="Group-size search: generations.")
@calib_option("--search-population", "search_population", type=int, help="Group-size search: candidates per generation.")
@calib_option("--search-top-k", "search_top_k", type=int, help="Group-size search: parents kept per generation.")
@calib_option("--search-images", "search_images", type=int, help="Group-size search: images sampled per candidate.")
@click.option("--asymmetric", is_flag=True, help="Asymmetric uint8 activations (CPU-only targets; TensorRT needs symmetric).")
@calib_option("--recon-loss", "recon_loss", type=click.Choice(RECON_LOSSES),
              help="Reconstruction loss: block-output, or fbr (+ each layer's output).")
@calib_option("--fbr-lambda", "fbr_lambda", type=float, help="fbr: weight of the layers' output MSE.")
@calib_option("--input-mixing", "input_mixing", type=click.Choice(INPUT_MIXING),
              help="The reconstructed block's input: none (quantized path) or qdrop (mixed with the FP path).")
@calib_option("--qdrop-prob", "qdrop_prob", type=float, help="qdrop: probability of each input element coming from the FP path.")
@calib_option("--weight-rounding", "weight_rounding", type=click.Choice(WEIGHT_ROUNDING),
              help="trained-weights, or learned-rounding (AdaRound, hardened).")
@calib_option("--bkd-lr-rounding", "bkd_lr_rounding", type=float, help="learned-rounding: learning rate of the rounding variables.")
@calib_option("--steps", "steps", type=int, help="Sampler steps: the timestep grid that is calibrated.")
@calib_option("--scheduler", "scheduler", type=click.Choice(list(SCHEDULERS)))
@calib_option("--seed", "seed", type=int)
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Text file, one prompt per line: record the calibration trajectories of a text-to-image pipeline "
                   "(--model: its directory) on these prompts, both halves of classifier-free guidance.")  # fmt: skip
@calib_option("--negative-prompt", "negative_prompt", help="With --prompts: the unconditional half's prompt.")
@calib_option("--guidance-scale", "guidance_scale", type=float, help="With --prompts: classifier-free guidance (1: none).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1),
              help="Calibrate on this many processes of this machine (one per GPU, or gloo on CPU) under torchrun.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Artifact directory to write.")
def calibrate_command(model: str, recipe_name: str | None, bits: str, quantize_attention: bool, attention_head_tables: bool,
                      asymmetric: bool, device: str, nproc: int, out: Path, prompts_file: Path | None, **options) -> None:  # fmt: skip
    """Calibrate a model (a method, or a named recipe) and write the calibration artifact."""
    from dilatequant.calibrate.distributed import launch, without_option
    from dilatequant.calibrate.flow import calibrate
    from dilatequant.calibrate.recipes import recipe
    from dilatequant.core.environment import resolve_device

    overrides = {key: value for key, value in options.items() if value is not None}
    if prompts_file is not None:
        overrides["prompts"] = tuple(read_prompts(prompts_file))
    elif "negative_prompt" in overrides or "guidance_scale" in overrides:
        raise UserError("--negative-prompt and --guidance-scale apply to prompted calibration; add --prompts FILE.")
    if "group_choices" in overrides:
        overrides["group_choices"] = group_sizes(overrides["group_choices"])
    flags = {"quantize_attention": quantize_attention, "attention_head_tables": attention_head_tables, "act_symmetric": not asymmetric}
    overrides.update({key: value for key, value in flags.items() if value != CalibConfig.__dataclass_fields__[key].default})
    config = recipe(recipe_name, bits, **overrides) if recipe_name else CalibConfig.from_bits(bits, **overrides)
    if nproc > 1:  # the same command on nproc ranks (checked above, before any process starts)
        return launch(nproc, without_option(sys.argv[1:], "--nproc"), device)
    start = time.perf_counter()
    path = calibrate(model, config, out, resolve_device(device), assume_schedule=options.get("scheduler") is not None)
    click.echo(f"wrote {path} ({config.bits_name}, {config.recipe}, {time.perf_counter() - start:.1f} s)")


def group_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--group-choices takes comma-separated integers such as 32,64,128, got '{text}'.") from None


@cli.command("export")
@click.option("--calib", default=None, type=click.Path(path_type=Path), help="Calibration artifact directory to export.")
@click.option("--model", default=None, help="Instead of --calib: export this model unquantized (the FP baseline). " + MODEL_HELP)
@click.option("--buckets", default="4", show_default=True, help="Number of timestep buckets, or 'auto'.")
@click.option("--profile", default=ExportConfig.profile, show_default=True, type=click.Choice(list(PROFILES)))
@click.option("--fp32", is_flag=True, help="tensorrt profile: keep the non-quantized parts in FP32 instead of FP16 "
              "(ort-cpu graphs are always FP32).")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="With --model: the precision of the unquantized graph.")
@click.option("--scales", default=ExportConfig.scales, show_default=True, type=click.Choice(SCALE_SOURCES),
              help="Activation scales per bucket: the calibrated (learned) rows, or re-derived from the bucket's samples.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Export directory to write.")
def export_command(calib: Path | None, model: str | None, buckets: str, profile: str, fp32: bool, precision: str, scales: str,
                   out: Path) -> None:  # fmt: skip
    """Export a calibration artifact to one Q/DQ ONNX graph per timestep bucket (or, with --model, one
    unquantized graph: the baseline that engines are compared with)."""
    from dilatequant.export.flow import export, export_unquantized

    if (calib is None) == (model is None):
        raise UserError("Pass exactly one of --calib DIR (a quantized export) or --model MODEL (an unquantized baseline).")
    start = time.perf_counter()
    if model is not None:
        path = export_unquantized(model, precision, out)
        click.echo(f"wrote {path} (unquantized {precision}, {time.perf_counter() - start:.1f} s)")
        return
    if buckets != "auto" and not buckets.isdigit():
        raise UserError(f"--buckets takes a positive count or 'auto', got '{buckets}'.")
    config = ExportConfig(buckets=buckets if buckets == "auto" else int(buckets), profile=profile, fp32=fp32, scales=scales)
    path = export(calib, config, out)
    click.echo(f"wrote {path} ({profile}, {time.perf_counter() - start:.1f} s)")


@cli.command("build")
@click.option("--export", "export_dir", required=True, type=click.Path(path_type=Path), help="Export directory (dilatequant export).")
@click.option("--backend", default=BuildConfig.backend, show_default=True, type=click.Choice(BACKENDS),
              help="torch: a reference executor of the Q/DQ graphs (GPU quality runs without TensorRT), not for latency.")
@click.option("--threads", default=BuildConfig.threads, show_default=True,
              help="onnxruntime: intra-op threads per session (0: the cores divided among the streams).")
@click.option("--streams", default=BuildConfig.streams, show_default=True,
              help="onnxruntime: sessions per bucket, each running a slice of the batch concurrently.")
@click.option("--provider", default=BuildConfig.provider, show_default=True,
              help="onnxruntime: execution provider (auto: TensorRT, CUDA, then CPU, as installed); "
                   "torch: auto, cpu, cuda or cuda:N.")
@click.option("--batch", "batch", default="1,8,32", show_default=True, help="tensorrt: min,opt,max batch of the optimization profile.")
@click.option("--tokens", default="1,77,512", show_default=True,
              help="min,opt,max encoder-state tokens of a text-conditioned model (CLIP 77, T5 120/300; +1 packed row): "
                   "TensorRT's optimization profile; `profile` times every backend at opt.")
@click.option("--dynamic-resolution", default=None, help="tensorrt: MIN,MAX image size instead of the model's fixed size.")
@click.option("--optimization-level", default=BuildConfig.optimization_level, show_default=True, help="tensorrt: builder optimization level 0-5.")
@click.option("--refittable", is_flag=True, help="tensorrt: refittable engines.")
@click.option("--strip-weights", is_flag=True, help="tensorrt: weight-stripped plans (refitted from the ONNX weights at load).")
@click.option("--prepack/--no-prepack", default=BuildConfig.prepack, show_default=True,
              help="onnxruntime: repacked integer weights per session (faster); --no-prepack keeps one copy (less memory).")
@click.option("--emit-trtexec", is_flag=True, help="tensorrt: write an equivalent trtexec script per bucket instead of building.")
@click.option("--integer-kernels", default=BuildConfig.integer_kernels, show_default=True, type=click.Choice(INTEGER_KERNELS),
              help="onnxruntime: u8u8 (exact everywhere) or u8s8 (faster, saturates on x86 CPUs without VNNI); auto picks by probing the CPU.")
@click.option("--fidelity", default=BuildConfig.fidelity, show_default=True, type=click.Choice(FIDELITY_MODES),
              help="Check every quantized layer of the engines against the graph: refuse (fail), write anyway (warn) or skip (off).")
@click.option("--fidelity-bound", default=BuildConfig.fidelity_bound, show_default=True,
              help="Largest relative error of one quantized layer's output against the graph run op by op.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Engine directory to write.")
def build_command(export_dir: Path, backend: str, threads: int, streams: int, provider: str, batch: str, tokens: str, dynamic_resolution: str | None,
                  optimization_level: int, refittable: bool, strip_weights: bool, prepack: bool, emit_trtexec: bool, integer_kernels: str,
                  fidelity: str, fidelity_bound: float, out: Path) -> None:  # fmt: skip
    """Build one engine per bucket graph of an export directory, and check the engines against the graphs."""
    from dilatequant.engines.engine import build
    from dilatequant.engines.fidelity import summary

    min_batch, opt_batch, max_batch = parse_ints(batch, "--batch", 3)
    min_tokens, opt_tokens, max_tokens = parse_ints(tokens, "--tokens", 3)
    sizes = parse_ints(dynamic_resolution, "--dynamic-resolution", 2) if dynamic_resolution else (16, 128)
    config = BuildConfig(backend=backend, threads=threads, streams=streams, provider=provider, min_batch=min_batch, opt_batch=opt_batch,
                         min_tokens=min_tokens, opt_tokens=opt_tokens, max_tokens=max_tokens,
                         max_batch=max_batch, dynamic_resolution=dynamic_resolution is not None, min_size=sizes[0],
                         max_size=sizes[1], optimization_level=optimization_level, refittable=refittable,
                         strip_weights=strip_weights, prepack=prepack, integer_kernels=integer_kernels, fidelity=fidelity,
                         fidelity_bound=fidelity_bound)  # fmt: skip
    start = time.perf_counter()
    if emit_trtexec:
        if backend != "tensorrt":
            raise UserError("--emit-trtexec writes TensorRT build scripts: add --backend tensorrt.")
        from dilatequant.engines.trtexec import write_trtexec_scripts

        scripts = write_trtexec_scripts(export_dir, config, out)
        click.echo(f"wrote {len(scripts)} trtexec scripts to {out}; run {out / 'build_all.sh'} on the GPU machine")
        return
    path = build(export_dir, config, out)
    report = json.loads((path / "manifest.json").read_text()).get("fidelity")
    if report is not None:
        click.echo(summary(report))
    click.echo(f"wrote {path} ({backend}, {time.perf_counter() - start:.1f} s)")


def parse_ints(text: str, option: str, count: int | None = None) -> tuple[int, ...]:
    """Comma-separated positive integers (exactly `count` of them when given); anything else is a UserError."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or (count is not None and len(values) != count) or min(values) < 1:
        amount = f"{count} comma-separated" if count is not None else "comma-separated"
        raise UserError(f"{option} takes {amount} positive integers, got '{text}'.")
    return values


@cli.command("profile")
@click.option("--engines", required=True, type=click.Path(path_type=Path), help="Engine directory to profile.")
@click.option("--compare", multiple=True, type=click.Path(path_type=Path), help="Baseline engine directory (repeatable).")
@click.option("--batch", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--runs", default=30, show_default=True, help="Timed calls per bucket and batch size (>= 30).")
@click.option("--warmup", default=5, show_default=True, help="Untimed calls per bucket first.")
@click.option("--sampling-steps", default=25, show_default=True, help="Steps of the timed end-to-end sampling loop.")
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path), help="profile.json to write.")
@click.option("--chart", default=None, type=click.Path(dir_okay=False, path_type=Path), help="PNG chart of p50 latency to write.")
@click.option("--max-ratio", default=None, help="BATCH=RATIO: exit 1 if ratio_p50 to the first baseline exceeds RATIO at BATCH.")
def profile_command(engines: Path, compare: tuple[Path, ...], batch: str, runs: int, warmup: int, sampling_steps: int,
                    out: Path | None, chart: Path | None, max_ratio: str | None) -> None:  # fmt: skip
    """Latency (p50/p95 per bucket and batch), sampling time per image and peak memory, side by side."""
    from dilatequant.engines.profile import ProfileConfig, markdown_table, profile
    from dilatequant.engines.profile import chart as save_chart

    limit = parse_max_ratio(max_ratio, bool(compare)) if max_ratio else None
    batches = parse_ints(batch, "--batch")
    for path in (out, chart):
        if path is not None:
            check_writable_file(path)
    config = ProfileConfig(batches=batches, runs=runs, warmup=warmup, sampling_steps=sampling_steps)
    report = profile(engines, list(compare), config, progress=lambda line: click.echo(line, err=True))
    click.echo(markdown_table(report))  # first: a late write failure must not lose the results
    if out is not None:
        write_result(out, json.dumps(report, indent=2) + "\n")
    if chart is not None:
        save_chart(report, chart)
    if limit is not None:
        check_ratio(report, *limit)


def parse_max_ratio(text: str, has_baseline: bool) -> tuple[str, float]:
    batch, _, ratio = text.partition("=")
    try:
        value = float(ratio)
    except ValueError:
        value = None
    if not batch.isdigit() or value is None:
        raise UserError(f"--max-ratio takes BATCH=RATIO (e.g. 8=1.0), got '{text}'.")
    if not has_baseline:
        raise UserError("--max-ratio compares with a baseline: add --compare BASELINE_DIR.")
    return batch, value


def check_ratio(report: dict, batch: str, limit: float) -> None:
    comparison = report["comparisons"][0]
    ratio = comparison["ratio_p50"].get(batch)
    if ratio is None:
        raise UserError(f"--max-ratio names batch {batch}, which was not profiled; add it to --batch.")
    verdict = "within" if ratio <= limit else "ABOVE"
    click.echo(f"ratio_p50 at batch {batch}: {ratio:.3f} ({comparison['engines']} / {comparison['baseline']}), {verdict} the limit {limit}")
    if ratio > limit:
        raise SystemExit(1)


@cli.command("demo")
@click.option("--out", default="demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for every artifact and report.html (an interrupted demo resumes there).")
@click.option("--n", default=200, show_default=True, type=click.IntRange(min=1), help="Images sampled per engine set for the quality numbers.")
@click.option("--streams", default=2, show_default=True, help="ONNX Runtime sessions per bucket, each running a slice of the batch.")
@click.option("--threads", default=BuildConfig.threads, show_default=True, help="ONNX Runtime intra-op threads per session (0: cores / streams).")
@click.option("--model", default=DemoConfig.model, show_default=True, type=click.Choice(list(ZOO)), help="The bundled model to run it on.")
def demo_command(out: Path, n: int, streams: int, threads: int, model: str) -> None:
    """Calibrate a bundled model (W8A8, quick), export 4 buckets, build ONNX Runtime engines, profile them against
    FP32, sample both and write OUT/report.html."""
    from .demo import run_demo

    start = time.perf_counter()
    config = DemoConfig(model=model, quality_n=n, streams=streams, threads=threads)
    report = run_demo(out, config, echo=lambda line: click.echo(line, err=True))
    summary = json.loads((Path(out) / "report.json").read_text())
    for target in summary["targets"]:
        click.echo(f"{'met   ' if target['met'] else 'MISSED'} {target['target']}: {target['measured']}" + (f" ({target['why']})" if target.get('why') else ''))
    click.echo(f"wrote {report} ({time.perf_counter() - start:.0f} s)")


@cli.command("lint")
@click.argument("graph", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--profile", default=ExportConfig.profile, show_default=True, type=click.Choice(list(PROFILES)))
@click.option("--allow-residual-add", is_flag=True, help="tensorrt: also accept Q/DQ on residual Add inputs.")
@click.option("--min-fused", default=0.95, show_default=True, help="ort-cpu: fail below this share of fused integer kernels.")
@click.option("--fidelity-bound", default=BuildConfig.fidelity_bound, show_default=True,
              help="ort-cpu: fail when a quantized layer's fused kernel is further than this from the graph (relative error).")
def lint_command(graph: Path, profile: str, allow_residual_add: bool, min_fused: float, fidelity_bound: float) -> None:
    """Check a Q/DQ graph against a profile's rules; non-zero exit on any violation. ort-cpu: which layers ONNX
    Runtime fuses into integer kernels on this CPU and, for a graph of an export directory, whether each fused
    kernel computes what the graph says (on the export's recorded inputs)."""
    from dilatequant.engines.fidelity import check_graph
    from dilatequant.export.lint import lint_tensorrt, load_for_lint, ort_fusion

    model = load_for_lint(graph)  # weights stay on disk: a graph may be beyond protobuf's 2 GB
    if PROFILES[profile].lint == "static-qdq":
        violations = lint_tensorrt(model, allow_residual_add)
        for violation in violations:
            click.echo(str(violation))
        click.echo(f"{graph}: {len(violations)} violation(s) of the {profile} profile")
        if violations:
            raise SystemExit(1)
        return
    config = BuildConfig(fidelity_bound=fidelity_bound)
    report = ort_fusion(graph)
    layers = check_graph(graph, config)
    report["fidelity"] = ("skipped: the graph is not a bucket graph of an export directory (no inputs to run it on)" if layers is None
                          else {"layer_bound": fidelity_bound, "worst_layers": [layer.describe() for layer in layers[:5]]})  # fmt: skip
    click.echo(json.dumps(report, indent=2))
    if report["fused_share"] < min_fused:
        raise click.ClickException(f"only {report['fused_share']:.0%} of the quantized Conv/MatMul/Gemm became integer "
                                   f"kernels (target {min_fused:.0%}); left in float: {', '.join(report['left_in_float'][:10])}")  # fmt: skip
    if layers and layers[0].rel_error > fidelity_bound:
        raise click.ClickException(f"layer {layers[0].describe()} is above the bound {fidelity_bound:.0e}: ONNX Runtime's "
                                   "kernel on this CPU does not compute what the graph says")  # fmt: skip


@cli.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_command(path: str, as_json: bool) -> None:
    """Say what a model directory, bundled model or calibration artifact holds; non-zero exit if malformed."""
    from .inspection import format_summary, inspect_path

    summary = inspect_path(path)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


cli.add_command(arena)


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one readable line on stderr, not Python's two-line form with a source line."""
    click.echo(f"Warning: {' '.join(str(message).split())}", err=True)


def main() -> None:
    warnings.showwarning = one_line_warning
    cli()


if __name__ == "__main__":
    main()
