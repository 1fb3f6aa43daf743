"""dilatequant side by side with ONNX Runtime's quantize_static / quantize_dynamic and NVIDIA ModelOpt on a bundled
model (`digits`, or `digits-dit`), in one run.

    python -m dilatequant.tools.bench --out bench [--quick] [--model digits-dit]
    python -m dilatequant.tools.bench --out bench-gpu --backend torch --device cuda --n 5000 --bkd-iters 400

Every entry is deployed the same way: its ONNX graph(s) -> ONNX Runtime CPU engines (`engines/`), sampled
through the engines with the same sampler, steps, seeds and n (quality: fid_digits, class_accuracy,
psnr_vs_fp against the FP32 engine), and profiled together in one process with interleaved rounds (p50 at
batch 1 and 8). Static per-bucket entries (DilateQuant's tables, ort-cpu) stand beside dynamic ones (Q-DiT's
per-token groups as MatMulNBits, ort-dynamic; ONNX Runtime's quantize_dynamic peers). Also recorded: calibration
(or quantization) wall time and bytes on disk. Peers calibrate on
dilatequant's calibration samples; two peer rows keep dilatequant's FP boundary layers for a like-for-like
comparison. Results: OUT/bench.json, OUT/bench.md, OUT/bench.png.

With `--backend torch` the same graphs are sampled by the torch reference executor (engines/torch_graph.py:
Q/DQ as fake quantization) on `--device`, for quality at large n on a GPU without TensorRT; latency is then
not measured. `--entries` runs a subset (FP32, the PSNR reference, always runs) and `--merge` joins the
bench.json files of runs split that way.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click

from dilatequant.core.atomic import atomic_write_text
from dilatequant.core.errors import UserError
from dilatequant.core.zoo import ZOO

QUICK = {"n": 20, "steps": 5, "samples": 32, "trajectories": 8, "sampling_steps": 2}


@dataclass(frozen=True)
class BenchConfig:
    model: str = "digits"
    n: int = 1000
    steps: int = 25
    seed: int = 0
    samples: int = 512
    trajectories: int = 32
    buckets: int = 4
    bkd_iters: int = 0
    boundary: str = "fp"
    streams: int = 2
    threads: int = 0
    runs: int = 30
    sampling_steps: int = 25
    batch_size: int = 50
    backend: str = "onnxruntime"  # or "torch": quality only
    device: str = "cpu"  # where dilatequant calibrates and torch engines run
    entries: tuple[str, ...] = ()  # a subset of entry_names(); () runs all

    def __post_init__(self) -> None:
        if self.backend not in ("onnxruntime", "torch"):
            raise UserError(f"--backend {self.backend}: the bench runs onnxruntime (latency and quality) or torch (quality).")
        unknown = sorted(set(self.entries) - set(entry_names(self)))
        if unknown:
            raise UserError(f"Unknown bench entries {', '.join(unknown)}; choose from {', '.join(entry_names(self))}.")

    def calibration(self, bits: str, recipe_name: str = "bench", **extra):
        """The CalibConfig of a dilatequant entry (the bench's data settings on `recipe_name`); the bench recipe's
        (x_t, t, class) samples are what every peer calibrates on."""
        from dilatequant.calibrate.recipes import get_recipe, recipe

        distills = get_recipe(get_recipe(recipe_name).method).distills
        iters = {"bkd_iters": self.bkd_iters} if distills else {}
        return recipe(recipe_name, bits, samples=self.samples, trajectories=self.trajectories, steps=self.steps,
                      boundary=self.boundary, seed=self.seed, **iters, **extra)  # fmt: skip

    def selected(self, name: str) -> bool:
        return not self.entries or name == "fp32" or name in self.entries


@dataclass(frozen=True)
class Entry:
    """A dilatequant row: a recipe at `bits` (with `extra` CalibConfig fields), exported in `profile` to `buckets` graphs."""

    bits: str
    extra: dict = field(default_factory=dict)
    buckets: int = 1
    recipe: str = "bench"
    profile: str = "ort-cpu"


def dilatequant_entries(config: BenchConfig) -> dict[str, Entry]:
    k = config.buckets
    return {
        "dilatequant-w8a8-k1": Entry("W8A8"),
        f"dilatequant-w8a8-k{k}": Entry("W8A8", buckets=k),
        f"dilatequant-w8a8-nowd-k{k}": Entry("W8A8", {"dilation": False}, k),
        f"dilatequant-w4a8-k{k}": Entry("W4A8", buckets=k),
        # Q-DiT: Linear weights in groups of 128, inputs quantized per token and group at run time (MatMulNBits)
        f"q-dit-w4a8-dynamic-k{k}": Entry("W4A8", buckets=k, recipe="q-dit", profile="ort-dynamic"),
    }


def entry_names(config: BenchConfig) -> list[str]:
    from .peers import PEERS

    return ["fp32", *dilatequant_entries(config), *PEERS]


def timed(work):
    """(result, seconds) of calling `work`."""
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def make_exports(config: BenchConfig, out: Path, echo) -> tuple[dict[str, Path], dict[str, float]]:
    """Every entry's export directory (one graph, or one per bucket for dilatequant) and its calibration (or
    quantization) seconds; entries that share a calibration each count it."""
    from dilatequant.calibrate.flow import calibrate
    from dilatequant.core.denoiser import load_model
    from dilatequant.export.config import ExportConfig
    from dilatequant.export.flow import export, export_single_graph, export_unquantized

    from .peers import PEERS, calibration_batches

    exports, seconds = {"fp32": export_unquantized(config.model, "fp32", out / "fp32")}, {"fp32": 0.0}
    calibrations: dict[tuple, tuple[Path, float]] = {}
    for name, entry in dilatequant_entries(config).items():
        if not config.selected(name):
            continue
        key = (entry.recipe, entry.bits, tuple(sorted(entry.extra.items())))
        if key not in calibrations:
            echo(f"[{name}] calibrating {entry.recipe} {entry.bits} {entry.extra or ''}")
            calib = config.calibration(entry.bits, entry.recipe, **entry.extra)
            work = out / f"calib-{len(calibrations)}"
            calibrations[key] = timed(lambda: calibrate(config.model, calib, work, device=config.device, progress=False))
        path, calibration_seconds = calibrations[key]
        export_config = ExportConfig(buckets=entry.buckets, profile=entry.profile)
        exports[name], export_seconds = timed(lambda: export(path, export_config, out / name))
        seconds[name] = calibration_seconds + export_seconds
    peers = [name for name in PEERS if config.selected(name)]
    data = peer_calibration_data(config, calibrations, echo) if any(PEERS[name].calibrates for name in peers) else None
    for name in peers:
        echo(f"[{name}] quantizing")
        loaded = load_model(config.model)  # fresh: ModelOpt edits the torch model in place
        batches = calibration_batches(data, loaded) if PEERS[name].calibrates else []
        graph, seconds[name] = timed(lambda: PEERS[name].quantize(loaded, batches, exports["fp32"] / "bucket_0.onnx"))
        exports[name] = export_single_graph(graph, loaded, name, "fp32", out / name)
    return exports, seconds


def peer_calibration_data(config: BenchConfig, calibrations: dict, echo):
    """The calibration samples peers get: the W8A8 calibration's, or (no dilatequant W8A8 entry selected) the
    same samples recorded on their own."""
    import torch

    from dilatequant.calibrate.artifact import load_artifact
    from dilatequant.calibrate.calib_data import CalibrationData, collect
    from dilatequant.core.denoiser import load_model
    from dilatequant.core.sampling import default_batch_size

    if ("bench", "W8A8", ()) in calibrations:
        return load_artifact(calibrations[("bench", "W8A8", ())][0]).calibration_data()
    echo("[peers] recording calibration samples")
    calib = config.calibration("W8A8")
    loaded, device = load_model(config.model, config.device), torch.device(config.device)
    data = collect(loaded.denoiser, loaded.scheduler_config, calib, device, default_batch_size(device), False)
    return CalibrationData(data.x.cpu(), data.t.cpu(), data.labels.cpu())


def quality(engines: dict[str, Path], config: BenchConfig, echo) -> dict[str, dict]:
    """Sample every entry's engines from the same noise; metrics, and PSNR against the FP32 engine's images."""
    from dilatequant.core.evaluate import labels_for, score
    from dilatequant.core.metrics import psnr_vs_ref
    from dilatequant.core.sampling import SamplerConfig, sample

    from .variants import load_variant

    sampler = SamplerConfig(steps=config.steps, seed=config.seed, batch_size=config.batch_size)
    results, reference = {}, None
    for name in ["fp32", *(n for n in engines if n != "fp32")]:  # FP32 first: the others' PSNR reference
        echo(f"[{name}] sampling {config.n} images")
        with load_variant(engines[name], kind="engines") as variant:
            model = variant.loaded
            labels = labels_for(model, config.n)
            images = sample(model.denoiser, model.scheduler_config, labels, sampler, progress=False)
        results[name] = {**score(images, labels), "psnr_vs_fp": None if reference is None else round(psnr_vs_ref(images, reference), 2)}
        reference = images if reference is None else reference
    return results


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")


def run_bench(config: BenchConfig, out: Path, echo=print) -> dict:
    from dilatequant.core.environment import library_versions
    from dilatequant.engines.config import BuildConfig
    from dilatequant.engines.engine import build
    from dilatequant.engines.profile import ProfileConfig, profile

    exports, seconds = make_exports(config, out / "work", echo)
    build_config = (BuildConfig(threads=config.threads, streams=config.streams) if config.backend == "onnxruntime"
                    else BuildConfig(backend="torch", provider=config.device))  # fmt: skip
    engines = {name: build(path, build_config, out / "work" / f"engines-{name}") for name, path in exports.items()}
    scores = quality(engines, config, echo)
    latency = None
    if config.backend == "onnxruntime":
        echo("[latency] all entries, interleaved")
        latency = profile(engines["fp32"], [p for n, p in engines.items() if n != "fp32"],
                          ProfileConfig(runs=config.runs, sampling_steps=config.sampling_steps, sampling_repeats=1), progress=echo)  # fmt: skip
    rows = {}
    for name, path in engines.items():
        batches = latency["engines"][path.name]["batches"] if latency else {}
        fidelity = json.loads((path / "manifest.json").read_text())["fidelity"]
        worst = max((b["worst_layers"][0]["rel_error"] for b in fidelity["buckets"] if b["worst_layers"]), default=None)
        rows[name] = {**scores[name], "p50_ms_batch1": batches.get("1", {}).get("p50_ms"), "p50_ms_batch8": batches.get("8", {}).get("p50_ms"),
                      "worst_layer_vs_graph": worst, "end_to_end_vs_graph": max(b["end_to_end_rel_error"] for b in fidelity["buckets"]),
                      "calibration_seconds": round(seconds[name], 1), "bytes_on_disk": directory_bytes(exports[name]),
                      "graphs": len(json.loads((exports[name] / "manifest.json").read_text())["graphs"])}  # fmt: skip
    device = json.loads((engines["fp32"] / "manifest.json").read_text())["device"]
    return {"config": asdict(config), "rows": rows, "device": device, "versions": {**library_versions(), **peer_versions()}}


def peer_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("onnxruntime", "onnx", "nvidia-modelopt"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def markdown(report: dict) -> str:
    lines = ["| entry | graphs | fid_digits | class_accuracy | psnr_vs_fp (dB) | p50 ms b1 | p50 ms b8 | calibration s | MB on disk "
             "| engine vs graph: worst layer / end to end |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in report["rows"].items():
        psnr, b1, b8 = (number(row[key]) for key in ("psnr_vs_fp", "p50_ms_batch1", "p50_ms_batch8"))
        fidelity = (f"{row['worst_layer_vs_graph'] or 0:.1e} / {row['end_to_end_vs_graph']:.1%}" if "end_to_end_vs_graph" in row
                    else "not recorded")  # rows of runs before the fidelity check  # fmt: skip
        lines.append(f"| {name} | {row['graphs']} | {row['fid_digits']:.2f} | {row['class_accuracy']:.3f} | {psnr} | {b1} | {b8} | "
                     f"{row['calibration_seconds']:.1f} | {row['bytes_on_disk'] / 1e6:.2f} | {fidelity} |")  # fmt: skip
    return "\n".join(lines)


def merge_reports(reports: list[dict]) -> dict:
    """One report from runs of the same configuration that differ only in --entries (runs split to fit a
    time limit). Their FP32 images, each run's PSNR reference, must agree: fid_digits and class_accuracy are
    their fingerprint (bytes on disk may differ by the graph's node names between versions)."""
    first = reports[0]
    settings = {key: value for key, value in first["config"].items() if key != "entries"}
    rows = {}
    for report in reports:
        if {k: v for k, v in report["config"].items() if k != "entries"} != settings or report["device"] != first["device"]:
            raise UserError("Only bench runs that differ in --entries alone (same settings, same device) can be merged.")
        if any(report["rows"]["fp32"][key] != first["rows"]["fp32"][key] for key in ("fid_digits", "class_accuracy")):
            raise UserError("The runs' FP32 rows differ, so their PSNRs have different references; they cannot be merged.")
        rows.update(report["rows"])
    order = entry_names(BenchConfig(buckets=settings["buckets"]))
    entries = [name for name in order if name in rows and name != "fp32"]
    return {**first, "config": {**first["config"], "entries": entries}, "rows": {name: rows[name] for name in order if name in rows},
            "merged_runs": len(reports)}  # fmt: skip


def number(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def scatter(report: dict, path: Path) -> None:
    """Quality (fid_digits, and paired PSNR against FP32) against p50 latency at batch 8, one marker per entry."""
    from dilatequant.core.plots import require_matplotlib, save_figure

    plt = require_matplotlib()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    markers = "osD^vP*Xph<>"
    for i, (name, row) in enumerate(report["rows"].items()):
        color = "tab:red" if name.startswith(("dilatequant", "q-dit")) else "black" if name == "fp32" else "tab:blue"
        style = {"color": color, "marker": markers[i % len(markers)], "label": name, "s": 36}
        axes[0].scatter(row["p50_ms_batch8"], row["fid_digits"], **style)
        if row["psnr_vs_fp"] is not None:
            axes[1].scatter(row["p50_ms_batch8"], row["psnr_vs_fp"], **style)
    axes[0].set_ylabel(f"fid_digits (n = {report['config']['n']}; lower is better)")
    axes[1].set_ylabel("PSNR vs FP32, same noise (dB)")
    for axis in axes:
        axis.set_xlabel("ONNX Runtime p50 latency at batch 8 (ms)")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    save_figure(figure, path)


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--quick", is_flag=True, help=f"Tiny settings ({QUICK}) that only keep the script working.")
@click.option("--n", default=1000, show_default=True, help="Images sampled per entry (same seed for all).")
@click.option("--bkd-iters", default=0, show_default=True, help="dilatequant: distillation iterations per block.")
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "torch"]),
              help="torch: sample the graphs with the torch reference executor (quality only, no latency).")
@click.option("--device", default="cpu", show_default=True, help="Where dilatequant calibrates and torch engines run (cpu, cuda).")
@click.option("--entries", default="", help="Comma-separated subset of the entries (FP32 always runs).")
@click.option("--model", default=BenchConfig.model, show_default=True, type=click.Choice(list(ZOO)), help="The bundled model.")
@click.option("--merge", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Instead of running: combine these bench.json files (runs that differ only in --entries) into OUT.")
def main(out: Path, quick: bool, n: int, bkd_iters: int, backend: str, device: str, entries: str, model: str,
         merge: tuple[Path, ...]) -> None:  # fmt: skip
    if merge:
        report = merge_reports([json.loads(path.read_text()) for path in merge])
    else:
        report = run(out, quick, n, bkd_iters, backend, device, entries, model)
    atomic_write_text(out / "bench.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "bench.md", markdown(report) + "\n")
    if report["config"]["backend"] == "onnxruntime":
        scatter(report, out / "bench.png")
    click.echo(markdown(report))


def run(out: Path, quick: bool, n: int, bkd_iters: int, backend: str, device: str, entries: str, model: str) -> dict:
    from dilatequant.core.sampling import default_batch_size

    batch_size = max(BenchConfig.batch_size, default_batch_size(device))
    config = BenchConfig(model=model, n=n, bkd_iters=bkd_iters, backend=backend, device=device, batch_size=batch_size,
                         entries=tuple(e for e in entries.split(",") if e))  # fmt: skip
    config = replace(config, **QUICK) if quick else config
    return run_bench(config, out, echo=lambda line: click.echo(line, err=True))


if __name__ == "__main__":
    main()
