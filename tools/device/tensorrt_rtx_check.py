"""Does NVIDIA's ONNX parser and builder accept our tensorrt-profile graphs? Checked with TensorRT-RTX, the one
TensorRT build that installs on the GPU machine (its runtime refuses the H100/H200's compute capability 9.0,
so this parses and builds but runs nothing: no latency, no outputs). See tools/device/tensorrt_rtx_check.sh.

    python3 tools/device/tensorrt_rtx_check.py REPORT.json EXPORT_DIR ...

Per bucket graph: parse errors (with node names), then a strongly typed build with one optimization profile
over the batch; reports success, build seconds, plan bytes and the network's layer count.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import tensorrt_rtx as trt

from dilatequant.engines.config import BuildConfig
from dilatequant.engines.tensorrt_backend import shape_profile


def check_graph(path: Path, logger) -> dict:
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    start = time.perf_counter()
    parsed = parser.parse_from_file(str(path))
    result = {"graph": str(path), "parsed": bool(parsed), "parse_errors": [str(parser.get_error(i)) for i in range(parser.num_errors)]}
    if not parsed:
        return result
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shape_profile(path, BuildConfig(backend="tensorrt")).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    result.update({"built": plan is not None, "plan_bytes": plan.nbytes if plan is not None else 0, "layers": network.num_layers,
                   "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    return result


def main() -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    report = {"tensorrt_rtx": trt.__version__, "results": []}
    for export_dir in map(Path, sys.argv[2:]):
        manifest = json.loads((export_dir / "manifest.json").read_text())
        for graph in manifest["graphs"].values():
            entry = check_graph(export_dir / graph, logger)
            entry.update({"profile": manifest["profile"], "precision": manifest["precision"],
                          "bits": manifest["source"].get("bits", "fp")})  # fmt: skip
            report["results"].append(entry)
            print(json.dumps(entry), file=sys.stderr)
    Path(sys.argv[1]).write_text(json.dumps(report, indent=2) + "\n")  # not stdout: TensorRT's logger writes there


if __name__ == "__main__":
    main()
