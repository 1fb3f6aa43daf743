"""Scale benchmark: wall time and peak resident memory of every stage of the real CLI at model sizes from `digits`
to SDXL, each stage in a fresh process (so one stage's peak is its own).

    python -m dilatequant.tools.scale --configs digits,sd15,sdxl --work /tmp/scale --out docs/results/scale

Configs: `digits` (the bundled 4.6M UNet), `sd15` (an SD-1.5-size UNet2DConditionModel, ~860M parameters) and
`sdxl` (an SDXL-size one, ~2.6B), the last two with random weights, built locally and saved as diffusers
folders with a DDPM scheduler config. Stages: calibrate (W8A8, no distillation, min/max ranges, a few samples on a 4-step grid), export with
the ort-cpu and tensorrt profiles, the unquantized FP32 export, ONNX Runtime builds of the ort-cpu export and
of the FP32 export, lint of each export, the engines' resident memory (engines/memory.py, 4 buckets, batch 1)
and one bucket's ONNX Runtime latency at batch 1 against FP32 (same process, interleaved). A stage that fails (e.g. out of memory) is recorded with its exit status and the last
line it printed; later stages that need its output are skipped. Results: OUT.json and OUT.md. Each finished stage is
recorded in WORK/<config>/stages.json: a re-run (after a crash, or to add the stages a time limit left out) keeps
the stages that succeeded, marked "an earlier run" in the table; delete that file to measure everything again.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from dilatequant.core.atomic import atomic_write_text

SD15 = {"sample_size": 64, "cross_attention_dim": 768}
SDXL = {"sample_size": 128, "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816}  # fmt: skip
# without added conditioning (text_embeds, time_ids): for a dilatequant that cannot call such a UNet yet
SDXL_PLAIN = {k: v for k, v in SDXL.items() if k not in ("addition_embed_type", "addition_time_embed_dim",
                                                          "projection_class_embeddings_input_dim")}  # fmt: skip
CONFIGS = {"sd15": SD15, "sdxl": SDXL, "sdxl-plain": SDXL_PLAIN}
BUNDLED = ("digits",)
DONE = "stages.json"  # in a config's work directory: each finished stage's record; delete it to measure all again
SHARD_SIZE = "10GB"  # diffusers' default: SD-1.5 size saves one file, SDXL size two


@dataclass(frozen=True)
class Stage:
    name: str
    argv: list[str]
    needs: tuple[str, ...] = ()  # stages whose output this one reads


def build_model(name: str, directory: Path) -> dict:
    """A random-weight UNet2DConditionModel of config `name` saved in `directory` (diffusers format) with a DDPM
    scheduler config beside it; returns its parameter count and bytes."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**CONFIGS[name])
    parameters = sum(p.numel() for p in model.parameters())
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True, max_shard_size=SHARD_SIZE)
    DDPMScheduler().save_config(staging / "scheduler")
    staging.rename(directory)
    return {"parameters": parameters, "fp32_weight_bytes": 4 * parameters}


def stages(model: str, work: Path, samples: int) -> list[Stage]:
    """The CLI commands of one config, in order."""
    cli = [sys.executable, "-m", "dilatequant.tools.cli"]
    cal, ort, trt, fp = work / "calib", work / "export-ort-cpu", work / "export-tensorrt", work / "export-fp32"
    return [
        Stage("calibrate", [*cli, "calibrate", "--model", model, "--bits", "W8A8", "--bkd-iters", "0", "--act-init", "minmax",
                            "--samples", str(samples), "--trajectories", "2", "--steps", "4", "--out", str(cal)]),
        Stage("export ort-cpu", [*cli, "export", "--calib", str(cal), "--profile", "ort-cpu", "--buckets", "4", "--out", str(ort)],
              ("calibrate",)),
        Stage("export tensorrt", [*cli, "export", "--calib", str(cal), "--profile", "tensorrt", "--buckets", "4", "--out", str(trt)],
              ("calibrate",)),
        Stage("export fp32", [*cli, "export", "--model", model, "--precision", "fp32", "--out", str(fp)]),
        Stage("lint ort-cpu", [*cli, "lint", "--profile", "ort-cpu", str(ort / "bucket_0.onnx")], ("export ort-cpu",)),
        Stage("lint tensorrt", [*cli, "lint", "--profile", "tensorrt", str(trt / "bucket_0.onnx")], ("export tensorrt",)),
        Stage("lint fp32 (ort-cpu)", [*cli, "lint", "--profile", "ort-cpu", "--min-fused", "0", str(fp / "bucket_0.onnx")], ("export fp32",)),
        Stage("build ort-cpu", [*cli, "build", "--export", str(ort), "--backend", "onnxruntime", "--fidelity", "off", "--out",
                                str(work / "engines-ort-cpu")], ("export ort-cpu",)),
        Stage("build fp32", [*cli, "build", "--export", str(fp), "--backend", "onnxruntime", "--fidelity", "off", "--out",
                             str(work / "engines-fp32")], ("export fp32",)),
        Stage("engine memory", [sys.executable, "-m", "dilatequant.engines.memory", str(work / "engines-ort-cpu"), "--batch", "1"],
              ("build ort-cpu",)),
        Stage("latency", [sys.executable, "-c", f"from dilatequant.tools.scale import latency; latency({str(work / 'engines-ort-cpu')!r}, "
                          f"{str(work / 'engines-fp32')!r}, {str(work / 'latency.json')!r})"], ("build ort-cpu", "build fp32")),
    ]  # fmt: skip


# A small parent for each stage: the kernel carries the spawning process's peak RSS into the child's ru_maxrss
# (posix_spawn shares its memory until exec), so the stage is spawned from this ~10 MB interpreter, not from the
# benchmark, and wait4 then gives the stage's true peak however briefly it was reached.
MEASURE = """import json, os, sys
log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2)])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}))
"""


def run_stage(argv: list[str], log: Path) -> dict:
    """Run one command in a fresh process: wall seconds, its peak RSS (GiB) and exit status."""
    start = time.perf_counter()
    measured = subprocess.run([sys.executable, "-c", MEASURE, str(log), *argv], env={**os.environ, "TQDM_DISABLE": "1"},
                              capture_output=True, text=True, check=True)  # fmt: skip
    seconds = time.perf_counter() - start
    outcome = json.loads(measured.stdout)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(outcome["maxrss_kib"] / 2**20, 2), "rc": outcome["rc"],
            "last_line": lines[-1][-300:] if lines else ""}  # fmt: skip


def run_config(name: str, work: Path, samples: int, only: set[str] | None = None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"config": name, "stages": {}}
    model = name
    if name not in BUNDLED:
        model_dir = work / "model"
        if not model_dir.is_dir():
            code = f"import json, pathlib; from dilatequant.tools.scale import build_model; print(json.dumps(build_model({name!r}, pathlib.Path({str(model_dir)!r}))))"
            result["stages"]["build model"] = run_stage([sys.executable, "-c", code], work / "build-model.log")
        result["model"] = json.loads((work / "model.json").read_text()) if (work / "model.json").is_file() else model_size(model_dir)
        atomic_write_text(work / "model.json", json.dumps(result["model"]))
        model = str(model_dir)
    else:
        result["model"] = bundled_size(name)
    done = read_json(work / DONE) or {}  # stages an earlier run of this work directory finished: kept, not re-run
    for stage in stages(model, work, samples):
        earlier = done.get(stage.name)
        if only is not None and stage.name not in only:  # not asked for: shown as an earlier run left it, if one did
            if earlier:
                result["stages"][stage.name] = {**earlier, "earlier_run": True}
            continue
        failed = [need for need in stage.needs if result["stages"].get(need, {}).get("rc") != 0]
        if failed:
            result["stages"][stage.name] = {"skipped": f"needs {', '.join(failed)}"}
            continue
        if earlier and earlier["rc"] == 0 and only is None:  # --stages names what to measure again
            result["stages"][stage.name] = {**earlier, "earlier_run": True}
            continue
        click.echo(f"{name}: {stage.name}: {shlex.join(stage.argv[2:])}", err=True)
        log = work / f"{stage.name.replace(' ', '-')}.log"
        record = done[stage.name] = result["stages"][stage.name] = run_stage(stage.argv, log)
        if record["rc"] == 0:
            record["summary"] = summary(stage.name, log)
        atomic_write_text(work / DONE, json.dumps(done, indent=1))
        click.echo(f"{name}: {stage.name}: {record}", err=True)
    result["latency"] = read_json(work / "latency.json")
    return result


def model_size(model_dir: Path) -> dict:
    import math

    from safetensors import safe_open

    count = 0
    for path in sorted(model_dir.glob("diffusion_pytorch_model*.safetensors")):
        with safe_open(str(path), "np") as weights:
            count += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    return {"parameters": count, "fp32_weight_bytes": 4 * count}


def bundled_size(name: str) -> dict:
    from dilatequant.core.denoiser import resolve_model_dir

    return model_size(resolve_model_dir(name))


def latency(quantized: str, fp32: str, out: str, runs: int = 5) -> None:
    """p50 seconds of bucket 0 of `quantized` and of the one FP32 bucket at batch 1, interleaved call by call in one
    process (`profile` times every bucket 30+ times: too long at SD size on 2 cores), on `profile`'s inputs (encoder
    states of the engines' built token count, 77); written to `out`."""
    import numpy as np

    from dilatequant.engines.engine import load
    from dilatequant.engines.profile import bucket_feeds
    from dilatequant.engines.runtime import EngineDenoiser

    times: dict[str, list[float]] = {"quantized": [], "fp32": []}
    with load(quantized) as engines_q, load(fp32) as engines_fp:
        inputs = bucket_feeds(EngineDenoiser(engines_q), 0, 1, seed=0)
        for run in range(runs + 1):
            for name, engines in (("quantized", engines_q), ("fp32", engines_fp)):
                start = time.perf_counter()
                engines.run(0, *inputs)
                if run:  # the first call of each warms up
                    times[name].append(time.perf_counter() - start)
    p50 = {name: float(np.median(values)) for name, values in times.items()}
    atomic_write_text(Path(out), json.dumps({"batch": 1, "runs": runs, "p50_s": p50, "ratio_p50": p50["quantized"] / p50["fp32"]}))


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def markdown(results: list[dict], machine: str, command: str) -> str:
    head = ["config", "params", "FP32 weights GB", "stage", "wall s", "peak RSS GiB", "peak / FP32 weights", "result"]
    rows = []
    for result in results:
        weights = result["model"]["fp32_weight_bytes"] / 1e9
        for stage, record in result["stages"].items():
            if "skipped" in record:
                rows.append([result["config"], "", "", stage, "", "", "", f"skipped ({record['skipped']})"])
                continue
            outcome = "ok" if record["rc"] == 0 else f"exit {record['rc']}: {record['last_line']}"
            if record["rc"] == 0 and record.get("summary"):
                outcome = record["summary"]
            if record.get("earlier_run"):
                outcome += " (an earlier run)"
            peak = record["peak_rss_gib"] * 2**30 / 1e9
            rows.append([result["config"], f"{result['model']['parameters'] / 1e6:.1f}M", f"{weights:.2f}", stage,
                         f"{record['seconds']:.0f}", f"{record['peak_rss_gib']:.2f}", f"{peak / weights:.2f}×", outcome])  # fmt: skip
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    latencies = [f"- {r['config']}: bucket 0 of the ort-cpu W8A8 engines {1e3 * r['latency']['p50_s']['quantized']:.0f} ms, "
                 f"FP32 {1e3 * r['latency']['p50_s']['fp32']:.0f} ms (ratio {r['latency']['ratio_p50']:.2f}; batch 1, p50 of "
                 f"{r['latency']['runs']} interleaved calls)" for r in results if r.get("latency")]  # fmt: skip
    return (f"Machine: {machine}\n\nCommand: `{command}`\n\n" + "\n".join(table) + "\n\nONNX Runtime latency (CPU):\n\n"
            + "\n".join(latencies or ["- not measured"]) + "\n")  # fmt: skip


def summary(stage: str, log: Path) -> str | None:
    """The line a table shows for a successful stage: lint's verdict, the engines' resident memory."""
    text = log.read_text(errors="replace")
    if stage.startswith("lint") and '"fused_share"' in text:
        report = json.loads(text[text.index("{"):text.rindex("}") + 1])
        return f"{report['integer_kernels']}/{report['quantized_compute_nodes']} quantized layers fused into integer kernels"
    if stage == "engine memory":
        report = json.loads(text.strip().splitlines()[-1])
        return f"{report['buckets_loaded']} buckets loaded and run: {report['rss_mb'] - report['baseline_rss_mb']:.0f} MiB resident"
    return None


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return f"{cpu}, {os.cpu_count()} cores, {memory / 2**20:.0f} GiB RAM, Python {platform.python_version()}"


@click.command()
@click.option("--configs", default="digits,sd15", show_default=True, help=f"Comma-separated: {', '.join([*BUNDLED, *CONFIGS])}.")
@click.option("--work", required=True, type=click.Path(file_okay=False, path_type=Path), help="Models, artifacts and logs (kept).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Writes OUT.json and OUT.md.")
@click.option("--samples", default=8, show_default=True, help="Calibration samples.")
@click.option("--stages", "only", default=None, help="Comma-separated stage names to run, again if an earlier run did (e.g. 'build "
              "ort-cpu,engine memory'); default: all not yet finished. Stages they need must have finished in an earlier run.")  # fmt: skip
def main(configs: str, work: Path, out: Path, samples: int, only: str | None) -> None:
    names = [name.strip() for name in configs.split(",") if name.strip()]
    unknown = [name for name in names if name not in (*BUNDLED, *CONFIGS)]
    if unknown:
        raise click.BadParameter(f"unknown config(s) {unknown}; choose from {', '.join([*BUNDLED, *CONFIGS])}", param_hint="--configs")
    chosen = None if only is None else {name.strip() for name in only.split(",")}
    known = {stage.name for stage in stages("digits", work, samples)}
    if chosen is not None and chosen - known:
        raise click.BadParameter(f"unknown stage(s) {sorted(chosen - known)}; choose from {', '.join(sorted(known))}", param_hint="--stages")
    results = [run_config(name, work / name, samples, chosen) for name in names]
    command = shlex.join(["python", "-m", "dilatequant.tools.scale", *sys.argv[1:]])
    document = {"machine": machine(), "command": command, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(document, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(results, document["machine"], command))
    click.echo(markdown(results, document["machine"], command))


if __name__ == "__main__":
    main()
