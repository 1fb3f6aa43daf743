"""Where do ONNX Runtime's engines leave the graph they were built from? (issue 11's bisection)

    python -m dilatequant.tools.fidelity_study --export EXPORT --out study.json [--kernels auto u8s8 u8u8]
                                               [--fp-outputs fp.npz]

For every bucket graph of an export and each integer-kernel choice (auto: as `dilatequant build` picks;
u8s8: ONNX Runtime's default; u8u8: `session.x64quantprecision`), on the export's recorded calibration
inputs: the one-step relative error against the FP model (the calibration artifact's dilated model, equal
to the original) of the graph run op by op (ONNX Runtime, no optimization), of the torch executor
(engines/torch_graph.py) and of the optimized session, and every quantized layer alone (engines/fidelity.py),
worst first. Run it under `qemu-x86_64 -cpu EPYC-Rome` to see an AVX2 CPU without VNNI from any x86 machine;
as the emulator runs ~100x slower, `--fp-outputs` saves (on a first, native run) and then reuses the outputs
that do not depend on the CPU's integer kernels: the FP model's, the op-by-op reference's and the torch executor's.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dilatequant.core.denoiser import load_model
from dilatequant.core.manifest import read_manifest
from dilatequant.engines.config import INTEGER_KERNELS, BuildConfig
from dilatequant.engines.fidelity import bucket_feeds, check_bucket, reference_feeds, reference_session, relative_error
from dilatequant.engines.onnxruntime_backend import BACKEND, cpu_name, u8s8_saturates
from dilatequant.engines.torch_graph import TorchGraph


def fp_outputs(export_dir: Path, manifest: dict, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The FP model's prediction: the calibration artifact's dilated model (the same function as the original)."""
    denoiser = load_model(Path(manifest["source"]["calibration"]) / "model").denoiser
    cond = torch.from_numpy(feeds["cond"]) if "cond" in feeds else None
    with torch.no_grad():
        return denoiser(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["t"]), cond).numpy()


def kernel_free_outputs(export_dir: Path, manifest: dict, key: str, feeds: dict) -> dict[str, np.ndarray]:
    """The outputs that do not depend on the CPU's integer kernels: FP model, op-by-op reference, torch executor."""
    graph = export_dir / manifest["graphs"][key]
    return {"fp": fp_outputs(export_dir, manifest, feeds), "reference (op by op)": reference_session(str(graph)).run(None, feeds)[0],
            "torch executor": TorchGraph(graph)(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()}  # fmt: skip


def study_bucket(export_dir: Path, manifest: dict, key: str, feeds: dict, kernels: list[str], work: Path,
                 cache: dict[str, np.ndarray]) -> dict:  # fmt: skip
    import onnx

    graph = export_dir / manifest["graphs"][key]
    feeds = reference_feeds(onnx.load(str(graph), load_external_data=False), feeds)
    if f"{key}/fp" not in cache:
        cache.update({f"{key}/{name}": value for name, value in kernel_free_outputs(export_dir, manifest, key, feeds).items()})
    fp = cache[f"{key}/fp"]
    row = {"bucket": key, "vs_fp": {name: relative_error(cache[f"{key}/{name}"], fp) for name in ("reference (op by op)", "torch executor")},
           "kernels": {}}  # fmt: skip
    for name in kernels:
        session = functools.partial(BACKEND.optimized_session, config=BuildConfig(integer_kernels=name))
        engine = session(graph, work / f"{key}.{name}.onnx")
        result = check_bucket(graph, key, feeds, lambda f, engine=engine: engine.run(None, f)[0], session, work, keep=5)
        row["vs_fp"][f"engine, {name} kernels"] = relative_error(engine.run(None, feeds)[0], fp)
        row["kernels"][name] = {"end_to_end_vs_reference": result.end_to_end, "worst_layers": [asdict(layer) | {"describe": layer.describe()}
                                                                                               for layer in result.worst_layers]}  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--kernels", nargs="+", default=list(INTEGER_KERNELS), choices=INTEGER_KERNELS)
    parser.add_argument("--fp-outputs", type=Path, default=None, help="npz of the kernel-independent outputs: read if present, else written")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    manifest = read_manifest(args.export, "export", "1.0")
    feeds = bucket_feeds(args.export, manifest)
    cache = dict(np.load(args.fp_outputs)) if args.fp_outputs and args.fp_outputs.exists() else {}
    with tempfile.TemporaryDirectory() as work:
        rows = [study_bucket(args.export, manifest, key, feeds[key], args.kernels, Path(work), cache) for key in manifest["graphs"]]
    if args.fp_outputs and not args.fp_outputs.exists():
        np.savez(args.fp_outputs, **cache)
    report = {"export": str(args.export), "cpu": cpu_name(), "u8s8_saturates": u8s8_saturates(), "buckets": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(row["bucket"], {k: f"{v:.4f}" for k, v in row["vs_fp"].items()})
        for name, result in row["kernels"].items():
            print(f"  {name}: end to end vs reference {result['end_to_end_vs_reference']:.4f}; worst layer {result['worst_layers'][0]['describe']}")


if __name__ == "__main__":
    main()
