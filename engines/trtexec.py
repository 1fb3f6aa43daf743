"""trtexec scripts that build the same engines as the TensorRT backend, for machines with TensorRT but no Python wheel.

    OUT/build_bucket_<k>.sh   trtexec for bucket k: strongly typed network, the batch (and resolution) profile of
                              `shape_profile`, builder optimization level, --refit / --stripWeights, TF32 off, and
                              OUT/bucket_<k>.plan with its detailed layer report OUT/bucket_<k>.layers.json
    OUT/build_all.sh          every bucket in turn, all sharing OUT/timing.cache

Scripts run from their own directory (the ONNX path is relative to it, weights.bin beside the graph), run the binary
$TRTEXEC (default: trtexec) and pass their own arguments on to it. trtexec ends each build with its short benchmark at
the opt shapes: the layer report is then exported through an execution context and, unlike after --skipInference,
carries the data types and formats of the batch-dependent tensors. Writing needs no TensorRT.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from dilatequant.core.atomic import atomic_write_text
from dilatequant.export.contract import read_export_manifest

from .config import BuildConfig
from .tensorrt_backend import TIMING_CACHE, ShapeRange, layers_file, plan_file, shape_profile

PROFILE_POINTS = ("min", "opt", "max")


def shapes_argument(shapes: dict[str, ShapeRange], point: int) -> str:
    """trtexec's shape list for one profile point: 'x:8x1x32x32,t:8,cond:8'."""
    return ",".join(f"{name}:{'x'.join(map(str, ranges[point]))}" for name, ranges in shapes.items())


def trtexec_arguments(graph: Path, bucket: str, config: BuildConfig, out_dir: Path) -> list[str]:
    """The trtexec flags equivalent to the backend's build of `graph` (see tensorrt_backend.engine_loader)."""
    shapes = shape_profile(graph, config)
    return [f"--onnx={os.path.relpath(graph.resolve(), out_dir.resolve())}", "--stronglyTyped",
            *(f"--{point}Shapes={shapes_argument(shapes, i)}" for i, point in enumerate(PROFILE_POINTS)),
            f"--builderOptimizationLevel={config.optimization_level}", f"--timingCacheFile={TIMING_CACHE}", "--noTF32",
            *(["--refit"] if config.refittable else []), *(["--stripWeights"] if config.strip_weights else []),
            f"--saveEngine={plan_file(bucket)}", "--profilingVerbosity=detailed",
            f"--exportLayerInfo={layers_file(bucket)}"]  # fmt: skip


def script(comment: str, commands: list[str]) -> str:
    """A bash script that runs `commands` from its own directory and stops at the first failure."""
    return "\n".join(["#!/usr/bin/env bash", f"# {comment} Written by dilatequant.", "set -euo pipefail", 'cd "$(dirname "$0")"',
                      *commands, ""])  # fmt: skip


def bucket_script(export_dir: Path, graph: str, bucket: str, config: BuildConfig, out_dir: Path) -> str:
    arguments = [shlex.quote(argument) for argument in trtexec_arguments(export_dir / graph, bucket, config, out_dir)]
    command = " \\\n    ".join(['exec "${TRTEXEC:-trtexec}"', *arguments, '"$@"'])
    return script(f"The TensorRT engine of {bucket}.", [command])


def write_trtexec_scripts(export_dir: str | Path, config: BuildConfig, out_dir: str | Path) -> list[Path]:
    """Write one executable trtexec build script per bucket graph of an export, and build_all.sh; returns their paths.
    Every script is rendered (and every shape refused) before the first is written, each one atomically."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    graphs = read_export_manifest(export_dir)["graphs"]
    scripts = {f"build_{bucket}.sh": bucket_script(export_dir, graph, bucket, config, out_dir) for bucket, graph in graphs.items()}
    every = [f'./{name} "$@"' for name in scripts]
    scripts["build_all.sh"] = script(f"Every bucket's engine, in turn: they share {TIMING_CACHE}.", every)
    paths = []
    for name, text in scripts.items():
        path = atomic_write_text(out_dir / name, text)
        path.chmod(0o755)
        paths.append(path)
    return paths
