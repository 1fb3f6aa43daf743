"""The calibration results table: FP vs naive min-max, +TPQ, +WD, EDA-DM, DilateQuant's and Q-DiT's recipes, per bit
width, on a bundled model (`digits`, or `digits-dit` for docs/results/dit.md).

    python -m dilatequant.tools.calibration_report run --bits W8A8 --n 5000 --device cuda --rows rows.json
    python -m dilatequant.tools.calibration_report merge --rows a.json --rows b.json --out rows.json
    python -m dilatequant.tools.calibration_report render --rows rows.json --out docs/results

`run` is resumable: rows already in the rows file are skipped, a row's sampling goes on from its last finished batch,
so the work can be split over several calls of a time-limited GPU machine, or over processes sharing one GPU (one
rows file each, then `merge`).
`render` writes calibration.md and calibration_act_ranges.png.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import click
import torch

from dilatequant.core.atomic import atomic_write_bytes, atomic_write_text
from dilatequant.core.denoiser import load_model
from dilatequant.core.environment import describe_device, library_versions, resolve_device
from dilatequant.core.evaluate import labels_for, score
from dilatequant.core.sampling import SamplerConfig, default_batch_size, sample

# row -> (its recipe in calibrate/recipes.py, overrides of that recipe), in the table's order
VARIANTS: dict[str, tuple[str, dict]] = {
    "naive min-max": ("naive-minmax", {}),
    "naive min-max + FP boundary layers": ("naive-minmax", {"boundary": "fp"}),  # the layers Q-DiT leaves in FP
    "+TPQ": ("minmax-tpq", {}),
    "+TPQ +WD": ("minmax-tpq-wd", {}),
    "EDA-DM": ("eda-dm", {}),
    "EDA-DM at 2000 iterations": ("eda-dm", {"bkd_iters": 2000}),  # DilateQuant's default budget, side by side
    "DilateQuant v1 (old defaults)": ("dilatequant-v1", {}),
    "DilateQuant v1 + FP boundary layers": ("dilatequant-v1-fp-boundary", {}),
    "DilateQuant (new defaults)": ("dilatequant", {}),
    "DilateQuant at 5000 iterations": ("dilatequant", {"bkd_iters": 5000}),  # the paper's iterations per block
    "DilateQuant + TDAC": ("dilatequant-tdac", {}),
    "DilateQuant + FBR/QDrop": ("dilatequant-fbr-qdrop", {}),
    "DilateQuant + 5120 samples": ("dilatequant", {"samples": 5120, "trajectories": 128}),  # the paper's count
    # attention matmul inputs quantized too, one table per timestep (exported) or per (timestep, head) (simulation only)
    "DilateQuant + attention matmuls": ("dilatequant", {"quantize_attention": True}),
    "DilateQuant + attention matmuls with head tables": ("dilatequant", {"quantize_attention": True, "attention_head_tables": True}),
    "DilateQuant + FP boundary layers": ("dilatequant-fp-boundary", {}),
    # RepQuant (docs/results/repquant.md): with and without its post-norm rewrite, attention in FP, the softmax on the
    # uniform tables the runtimes run instead of log√2, and composed with DilateQuant
    "RepQuant": ("repquant", {}),
    "RepQuant without the post-norm rewrite": ("repquant", {"reparameterise": False}),
    "RepQuant with attention in FP": ("repquant", {"quantize_attention": False}),
    "RepQuant with a uniform softmax": ("repquant", {"softmax_quantizer": "uniform"}),
    "RepQuant + FP boundary layers": ("repquant", {"boundary": "fp"}),
    "DilateQuant + RepQuant": ("dilatequant-repquant", {}),
    # Q-DiT's ablation (docs/results/dit.md): group-wise weights with static tables, + dynamic inputs, + the search
    "Q-DiT groups of 128 with static activations": ("q-dit", {"act_dynamic": False}),
    "Q-DiT groups of 128 + dynamic activations": ("q-dit", {}),
    "Q-DiT + group-size search": ("q-dit-search", {}),
}
# iterations per block of rows written before rows recorded them
VARIANT_ITERS = {"DilateQuant v1 (old defaults)": 400, "DilateQuant v1 + FP boundary layers": 400}
RANGE_VARIANTS = ("naive min-max", "+TPQ", "+TPQ +WD")
# +TPQ +WD is drawn dashed over a wide +TPQ line: where dilation does not shrink the range, they coincide.
RANGE_STYLES = {"naive min-max": {"linewidth": 1.5}, "+TPQ": {"linewidth": 4, "alpha": 0.45}, "+TPQ +WD": {"linestyle": "--"}}
RANGE_GROUPS = ("conv_in", "down_blocks.1.attentions.0.qkv", "mid_block.resnets.0.conv1", "up_blocks.2.resnets.0.conv2")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def load_rows(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"rows": [], "ranges": {}}


def act_ranges(artifact_dir: Path) -> dict[str, dict]:
    """Per-timestep clipping range (step x qmax) of the RANGE_GROUPS activation quantizers."""
    from dilatequant.calibrate.artifact import load_artifact

    artifact = load_artifact(artifact_dir)
    quantizers = artifact.model.denoiser.act_quantizers()
    return {group: {"timesteps": artifact.record.timesteps, "range": (q.step.detach() * q.fmt.qmax).tolist()}
            for group, q in quantizers.items() if group in RANGE_GROUPS}  # fmt: skip


@click.group()
def main() -> None:
    """Produce and render the calibration results table."""


@main.command()
@click.option("--model", default="digits", show_default=True, help="The bundled model (or model directory) every row calibrates.")
@click.option("--bits", default="W8A8,W4A8,W4A4", show_default=True)
@click.option("--variants", default=",".join(VARIANTS), show_default=True, help="Comma-separated subset of the rows.")
@click.option("--n", default=5000, show_default=True)
@click.option("--steps", default=50, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Sampling noise seed of every row (the FP row's too).")
@click.option("--samples", type=int, default=None, help="Calibration samples.  [default: each recipe's]")
@click.option("--trajectories", type=int, default=None, help="FP trajectories.  [default: each recipe's]")
@click.option("--bkd-iters", type=int, default=None, help="Distillation iterations per block of the distilling recipes.  [default: each recipe's]")
@click.option("--device", default="auto", show_default=True)
@click.option("--work", default="calibration-work", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rows", "rows_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reference", "reference_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="FP images of these sampler settings: read if the file exists, else sampled and written there "
                   "(processes sharing one GPU sample the FP model once).")
def run(model: str, bits: str, variants: str, n: int, steps: int, seed: int, samples: int | None, trajectories: int | None, bkd_iters: int | None,
        device: str, work: Path, rows_path: Path, reference_path: Path | None) -> None:  # fmt: skip
    """Calibrate and evaluate every (bits, variant) row not yet in the rows file."""
    from dilatequant.calibrate.artifact import load_artifact
    from dilatequant.calibrate.flow import calibrate
    from dilatequant.calibrate.recipes import get_recipe, recipe

    results = load_rows(rows_path)
    done = {(r["bits"], r["variant"]) for r in results["rows"] if r.get("model", "digits") == model}  # rows before --model: digits
    unknown = set(variants.split(",")) - set(VARIANTS)
    if unknown:
        raise click.UsageError(f"unknown variants {sorted(unknown)}; variants: {', '.join(VARIANTS)}")
    wanted = sorted(VARIANTS.items(), key=lambda item: get_recipe(item[1][0]).method != "dilatequant")  # DilateQuant first
    given = {k: v for k, v in (("samples", samples), ("trajectories", trajectories)) if v is not None}
    pending = [(preset, variant, options) for preset in bits.split(",") for variant, options in wanted
               if (preset, variant) not in done and variant in variants.split(",")]  # fmt: skip
    if not pending and ("FP", "FP") in done:
        click.echo(f"every requested row is already in {rows_path}")
        return
    torch_device = resolve_device(device)
    sampler = SamplerConfig(steps=steps, seed=seed, batch_size=default_batch_size(torch_device))
    fp = load_model(model, torch_device)
    labels = labels_for(fp, n)
    fp_images = reference_images(fp, labels, sampler, torch_device, reference_path)
    common = {"model": model, "n": n, "steps": steps, "seed": seed, "device": describe_device(torch_device)}
    if ("FP", "FP") not in done:
        results["rows"].append({"bits": "FP", "variant": "FP", **common, **score(fp_images, labels, fp_images)})
    for preset, variant, (name, overrides) in pending:
        distills = get_recipe(get_recipe(name).method).distills
        iters = {"bkd_iters": bkd_iters} if distills and bkd_iters is not None else {}
        config = recipe(name, preset, steps=steps, **{**overrides, **given, **iters})  # the command line wins
        out = work / f"{preset}-{slug(variant)}"
        start = time.perf_counter()
        reused = calibrated(out, config)
        partial = out.with_name(f"{out.name}.samples-n{n}.pt")  # this row's finished batches, kept across kills
        if not reused:
            partial.unlink(missing_ok=True)
            calibrate(model, config, out, torch_device)
        seconds = time.perf_counter() - start
        artifact = load_artifact(out, torch_device)
        images = sample(artifact.model.denoiser, fp.scheduler_config, labels, sampler, torch_device, checkpoint=partial)
        metrics = score(images, labels, fp_images)
        metrics["psnr_vs_fp"] = metrics.pop("psnr_vs_ref")
        ran = artifact.record.run  # what the calibration itself measured
        blocks = artifact.record.statistics.get("blocks", {}).values()
        searched = artifact.record.statistics.get("group_search")  # the group sizes found, every generation's best
        results["rows"].append({"bits": preset, "variant": variant, "recipe": name, "recipe_version": get_recipe(name).version,
                                "overrides": overrides, **({"group_search": searched} if searched else {}),
                                "bkd_iters": config.bkd_iters if distills else None, **common, **metrics,
                                # a reused artifact's own phases, not this process's wall time
                                "calib_seconds": round(sum(ran["seconds"].values()) if reused else seconds, 1),
                                "phase_seconds": ran["seconds"], "resumed_blocks": sum(bool(b.get("resumed")) for b in blocks),
                                "peak_cuda_mib": max(ran.get("peak_cuda_mib", {}).values(), default=None),
                                "peak_rss_mib": ran.get("peak_rss_mib")})  # fmt: skip
        if preset == "W8A8" and variant in RANGE_VARIANTS:
            results["ranges"][variant] = act_ranges(out)
        results["versions"] = library_versions()
        atomic_write_text(rows_path, json.dumps(results, indent=2) + "\n")
        partial.unlink()
        click.echo(json.dumps(results["rows"][-1]))
    atomic_write_text(rows_path, json.dumps(results, indent=2) + "\n")


def calibrated(out: Path, config) -> bool:
    """Whether `out` already holds a complete artifact of this CalibConfig (a run stopped during its evaluation)."""
    from dilatequant.calibrate.contract import load_artifact
    from dilatequant.core.manifest import ArtifactError

    try:
        return load_artifact(out).config == config
    except (ArtifactError, OSError, ValueError):
        return False


def reference_images(fp, labels: torch.Tensor, sampler: SamplerConfig, device: torch.device, path: Path | None) -> torch.Tensor:
    """The FP model's images for `labels` under `sampler`, from `path` when it holds them (checked), else sampled
    (and written to `path` when given)."""
    key = {"model": fp.source, "n": len(labels), "steps": sampler.steps, "seed": sampler.seed, "scheduler": sampler.scheduler}
    if path is not None and path.is_file():
        saved = torch.load(path)
        if saved["key"] != key:
            raise click.UsageError(f"{path} holds FP images of {saved['key']}, not of {key}; pass another --reference path.")
        return saved["images"]
    partial = path.with_name(f"{path.name}.partial") if path is not None else None
    images = sample(fp.denoiser, fp.scheduler_config, labels, sampler, device, checkpoint=partial)
    if path is not None:
        buffer = io.BytesIO()
        torch.save({"key": key, "images": images}, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        partial.unlink()
    return images


@main.command()
@click.option("--model", default="digits", show_default=True)
@click.option("--n", default=5000, show_default=True)
@click.option("--steps", default=50, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
def reference(model: str, n: int, steps: int, seed: int, device: str, out_path: Path) -> None:
    """Sample the FP images `run --reference` reads (once, before processes that share them start)."""
    torch_device = resolve_device(device)
    fp = load_model(model, torch_device)
    reference_images(fp, labels_for(fp, n), SamplerConfig(steps=steps, seed=seed, batch_size=default_batch_size(torch_device)),
                     torch_device, out_path)  # fmt: skip
    click.echo(f"wrote {out_path}")


@main.command()
@click.option("--rows", "inputs", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
def merge(inputs: tuple[Path, ...], out_path: Path) -> None:
    """Merge rows files (a later file's row replaces an earlier one's of the same bits and variant)."""
    merged: dict = {"rows": [], "ranges": {}}
    for path in inputs:
        results = load_rows(path)
        keys = {(r["bits"], r["variant"]) for r in results["rows"]}
        merged["rows"] = [r for r in merged["rows"] if (r["bits"], r["variant"]) not in keys] + results["rows"]
        merged["ranges"].update(results.get("ranges", {}))
        merged["versions"] = results.get("versions", merged.get("versions"))
    atomic_write_text(out_path, json.dumps(merged, indent=2) + "\n")
    click.echo(f"wrote {out_path} ({len(merged['rows'])} rows)")


@main.command()
@click.option("--bkd-iters", default=20, show_default=True)
@click.option("--device", default="cuda", show_default=True)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
def memory(bkd_iters: int, device: str, out_path: Path) -> None:
    """Peak CUDA memory of distillation per block vs one backward pass through the whole quantized model."""
    import tempfile

    from dilatequant.calibrate.artifact import load_artifact
    from dilatequant.calibrate.config import CalibConfig
    from dilatequant.calibrate.flow import calibrate

    torch_device = resolve_device(device)
    if torch_device.type != "cuda":
        raise click.UsageError("memory measures CUDA allocations: run it with --device cuda on a GPU machine.")
    config = CalibConfig.from_bits("W8A8", bkd_iters=bkd_iters)
    with tempfile.TemporaryDirectory() as tmp:
        calibrate("digits", config, Path(tmp) / "calib", torch_device, progress=False)
        artifact = load_artifact(Path(tmp) / "calib", torch_device)
        blocks = artifact.record.statistics["blocks"]
        data = artifact.calibration_data()
    model = artifact.model.denoiser.train()
    model.requires_grad_(True)
    x, t, labels = data.x[: config.bkd_batch].to(torch_device), data.t[: config.bkd_batch].to(torch_device), data.labels
    torch.cuda.reset_peak_memory_stats(torch_device)
    model(x, t, model.conditioning(labels[: config.bkd_batch]).to(torch_device)).pow(2).mean().backward()
    record = {
        "device": describe_device(torch_device), "batch": config.bkd_batch,
        "largest_block_peak_cuda_mib": max(b["peak_cuda_mib"] for b in blocks.values()),
        "largest_block": max(blocks, key=lambda name: blocks[name]["peak_cuda_mib"]),
        "whole_model_backward_peak_cuda_mib": round(torch.cuda.max_memory_allocated(torch_device) / 2**20, 1),
        "blocks": {name: {k: b[k] for k in ("peak_cuda_mib", "cache_mib")} for name, b in blocks.items()},
    }  # fmt: skip
    atomic_write_text(out_path, json.dumps(record, indent=2) + "\n")
    click.echo(json.dumps({k: v for k, v in record.items() if k != "blocks"}))


@main.command()
@click.option("--calib", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
def selection(calib: Path, out_path: Path) -> None:
    """Plot a calibration's samples per timestep (and TDAC's density and diversity) as PNG."""
    from dilatequant.calibrate.contract import load_artifact

    from .report import selection_plot

    record = load_artifact(calib).record.statistics.get("data_selection")
    if not record:
        raise click.ClickException(f"{calib} records no data selection (calibrated before it was recorded); recalibrate.")
    selection_plot(record, out_path)
    click.echo(f"wrote {out_path} ({record['mode']}: {sum(record['counts'])} samples over {len(record['counts'])} timesteps)")


def fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def calib_cell(row: dict) -> str:
    """Calibration seconds; ‡ where blocks or a search were resumed from an earlier device call (that call's seconds
    left out)."""
    resumed = row.get("resumed_blocks") or row.get("group_search", {}).get("resumed")
    return fmt(row.get("calib_seconds"), 1) + (" ‡" if resumed else "")


def table(rows: list[dict], fp: dict) -> list[str]:
    lines = ["| bits | variant | iterations | fid_digits | vs FP | class_accuracy | psnr_vs_fp (dB) | calibration (s) "
             "| peak CUDA (MiB) | machine |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        ratio = r["fid_digits"] / fp["fid_digits"]
        relative = "—" if r is fp else f"{100 * (ratio - 1):+.1f}%" if ratio < 2 else f"×{ratio:.1f}"
        psnr = "—" if r is fp else fmt(r.get("psnr_vs_fp"), 2)
        iters = fmt(r.get("bkd_iters", VARIANT_ITERS.get(r["variant"])))
        lines.append(f"| {r['bits']} | {r['variant']} | {iters} | {fmt(r['fid_digits'], 2)} | {relative} | {fmt(r['class_accuracy'])} "
                     f"| {psnr} | {calib_cell(r)} | {fmt(r.get('peak_cuda_mib'), 0)} | {r['device'].removeprefix('NVIDIA ')} |")  # fmt: skip
    return lines


def plot_ranges(ranges: dict, path: Path) -> None:
    from dilatequant.core.plots import require_matplotlib, save_figure

    plt = require_matplotlib()
    groups = sorted({g for variant in ranges.values() for g in variant}, key=RANGE_GROUPS.index)
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), squeeze=False)
    for axis, group in zip(axes[0], groups):
        for variant, per_group in ranges.items():
            entry = per_group[group]
            values = entry["range"] * (len(entry["timesteps"]) if len(entry["range"]) == 1 else 1)
            axis.plot(entry["timesteps"], values, label=variant, drawstyle="steps-mid", **RANGE_STYLES.get(variant, {}))
        axis.set_title(group, fontsize=9)
        axis.set_xlabel("timestep t")
        axis.invert_xaxis()
    axes[0][0].set_ylabel("activation clipping range (W8A8)")
    axes[0][-1].legend(fontsize=8)
    save_figure(fig, path)


@main.command()
@click.option("--rows", "rows_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--floor", "floor_path", default="docs/results/noise_floor_n5000.json", type=click.Path(path_type=Path))
@click.option("--memory", "memory_path", default="docs/results/bkd_memory.json", type=click.Path(path_type=Path))
@click.option("--notes", "notes_path", default="docs/results/calibration_notes.md", type=click.Path(path_type=Path),
              help="Hand-written findings appended to the generated page.")
@click.option("--out", default="docs/results", type=click.Path(file_okay=False, path_type=Path))
def render(rows_path: Path, floor_path: Path, memory_path: Path, notes_path: Path, out: Path) -> None:
    """Write calibration.md and calibration_act_ranges.png from a rows file."""
    results = load_rows(rows_path)
    rows = results["rows"]
    fp = next(r for r in rows if r["bits"] == "FP")
    order = ["FP", "W8A8", "W4A8", "W4A4"]
    rows = sorted(rows, key=lambda r: (order.index(r["bits"]), list(VARIANTS).index(r["variant"]) if r["variant"] in VARIANTS else -1))
    floor = json.loads(floor_path.read_text())["summary"]["fid_digits"] if floor_path.is_file() else None
    lines = [f"# Calibration results: `digits`, DDIM {fp['steps']} steps, n = {fp['n']}", "",
             "Measured by `python -m dilatequant.tools.calibration_report run` on the machine each row names (latest "
             f"run: {', '.join(f'{k} {v}' for k, v in results.get('versions', {}).items())}). Every row samples the "
             "same initial noise (seed 0), so psnr_vs_fp is paired. Iterations: distillation iterations per block "
             "(— where the method does not distil).", "", *table(rows, fp), ""]  # fmt: skip
    lines += ["Peak CUDA: the calibration's largest allocation over its phases (recorded from issue 13 on; earlier "
              "rows: —). Calibration seconds are wall time, and the H200 rows calibrated 7 or 8 at a time on the one GPU, "
              "so theirs are upper bounds of the time alone. ‡: resumed from block checkpoints of an earlier device "
              "call; its seconds and peak are the last call's only.", ""]
    if floor:
        lines += [f"Seed-to-seed noise floor of the FP model at n = 5000 (seeds 0–2): fid_digits {floor['mean']:.2f} "
                  f"± {floor['std']:.2f} (min {floor['min']:.2f}, max {floor['max']:.2f}).", ""]  # fmt: skip
    if memory_path.is_file():
        mem = json.loads(memory_path.read_text())
        lines += [f"Distillation memory ({mem['device']}, batch {mem['batch']}, `calibration_report memory`): the "
                  f"largest block (`{mem['largest_block']}`) peaked at {mem['largest_block_peak_cuda_mib']:.0f} MiB of "
                  f"CUDA memory, its cache of inputs and targets for all calibration samples included; for comparison, "
                  f"one backward pass through the whole quantized model at the same batch, with no cache, peaks at "
                  f"{mem['whole_model_backward_peak_cuda_mib']:.0f} MiB.", ""]  # fmt: skip
    if results.get("ranges"):
        plot_ranges(results["ranges"], out / "calibration_act_ranges.png")
        lines += ["Per-timestep W8A8 clipping ranges of four input groups (min/max initialisation): one shared "
                  "range without TPQ, one per timestep with it; dashed: after weight dilation.", "",
                  "![per-timestep activation ranges](calibration_act_ranges.png)", ""]  # fmt: skip
    if notes_path.is_file():
        lines.append(notes_path.read_text())
    atomic_write_text(out / "calibration.md", "\n".join(lines))
    click.echo(f"wrote {out / 'calibration.md'}")


if __name__ == "__main__":
    main()
