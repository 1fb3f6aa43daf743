"""`export()`: calibration artifact in, one Q/DQ ONNX graph per timestep bucket out (sharing one weights file).

    OUT/manifest.json        kind "export": profile, bucket table, files, sha256, source artifact
    OUT/bucket_<k>.onnx      graph k: identical structure, only activation scales differ
    OUT/weights.bin          the external data every bucket graph references
    OUT/check_inputs.safetensors  a few calibration inputs per bucket (x, t, labels): what the engines'
                             fidelity check runs the graphs on
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from dilatequant.calibrate.artifact import SEPARATOR, load_artifact
from dilatequant.calibrate.calib_data import CalibrationData
from dilatequant.calibrate.quant_model import OUTPUT_SUFFIX
from dilatequant.calibrate.structure import input_groups
from dilatequant.core.denoiser import load_model
from dilatequant.core.environment import library_versions
from dilatequant.core.errors import MissingDependencyError, UserError
from dilatequant.core.manifest import MANIFEST_NAME, check_replaceable, sha256_file, staged_directory

from .buckets import BucketTable, bucketed_model, choose_buckets
from .compact import compact
from .config import ExportConfig
from .graph import compute_node_names, export_fp_graph
from .simplify import simplify
from .precision import to_float16
from .qdq import ACT_SCALE, ACT_ZERO_POINT, insert_activation_qdq, insert_output_qdq, pack_int4_weights, quantize_weights

KIND = "export"
FORMAT_VERSION = "1.0"
WEIGHTS_FILE = "weights.bin"
CHECK_INPUTS_FILE = "check_inputs.safetensors"
CHECK_SAMPLES_PER_BUCKET = 4
# ONNX Runtime fuses these into QLinearConv / QGemm only when their output is quantized too (measured, ORT 1.31)
FUSED_WITH_OUTPUT = ("Conv", "Gemm")


def require_onnx():
    try:
        import onnx
        import onnx_graphsurgeon as gs
    except ImportError as exc:
        raise MissingDependencyError("ONNX export", exc.name or "onnx", "export") from exc
    return onnx, gs


def check_exportable(artifact) -> None:
    config = artifact.config
    if config.act_bits != 8:
        raise UserError(f"{artifact.path} quantizes activations to {config.act_bits} bits; ONNX QuantizeLinear "
                        "graphs for TensorRT and ONNX Runtime take 8-bit activations. Calibrate with A8 (e.g. W4A8).")  # fmt: skip
    if config.quantize_attention:
        raise UserError(f"{artifact.path} quantizes attention matmul inputs; export does not support that yet. "
                        "Calibrate without --quantize-attention.")  # fmt: skip


def fp_graph(artifact, config: ExportConfig, work: Path):
    """The exported FP graph (onnx-graphsurgeon) and its quantized layers' compute nodes."""
    onnx, gs = require_onnx()
    fp_path = work / "fp.onnx"
    export_fp_graph(load_model(artifact.path / "model").denoiser, fp_path, config.opset)
    graph = simplify(onnx.load(str(fp_path)))
    return graph, name_layer_nodes(graph, [row["layer"] for row in artifact.plan["layers"] if row["weight_bits"]])


def name_layer_nodes(graph, layers: list[str]) -> dict:
    """Rename each layer's Conv/Gemm/MatMul node after the layer (names survive compact()); layer -> node."""
    by_name = {node.name: node for node in graph.nodes}
    names = compute_node_names([(n.name, n.op) for n in graph.nodes], layers)
    for layer, name in names.items():
        by_name[name].name = layer
    return {layer: by_name[name] for layer, name in names.items()}


def output_quantized_layers(graph, nodes: dict, profile: str) -> frozenset[str]:
    """ort-cpu: every quantized Conv/Gemm whose output is not the model's prediction (ONNX Runtime fuses them
    into integer kernels only with their output quantized, DESIGN.md §4). tensorrt: none (no Q/DQ on outputs)."""
    if profile != "ort-cpu":
        return frozenset()
    outputs = {tensor.name for tensor in graph.outputs}
    return frozenset(layer for layer, node in nodes.items() if node.op in FUSED_WITH_OUTPUT and node.outputs[0].name not in outputs)


def quantize_graph(graph, nodes: dict, artifact, bucketed, config: ExportConfig):
    """The quantized graph with bucket 0's activation scales, as an onnx ModelProto."""
    _, gs = require_onnx()
    plan = [row for row in artifact.plan["layers"] if row["weight_bits"]]
    steps = {row["layer"]: artifact.tensors[f"{row['layer']}{SEPARATOR}weight_step"].numpy() for row in plan}
    quantize_weights(graph, nodes, steps, {row["layer"]: row["weight_bits"] for row in plan})
    unsigned = config.profile == "ort-cpu"
    for index, (group, quantizer) in enumerate(bucketed.denoiser.act_quantizers().items()):
        scale, zero_point = quantizer.step[0].item(), int(quantizer.zero_point[0].item())
        if group.endswith(OUTPUT_SUFFIX):
            insert_output_qdq(graph, group, index, nodes[group.removesuffix(OUTPUT_SUFFIX)], scale, zero_point,
                              quantizer.fmt.symmetric, unsigned)  # fmt: skip
            continue
        consumers = [nodes[row["layer"]] for row in plan if row["group"] == group]
        prescale = None
        if quantizer.prescale and bool((quantizer.dilation != 1).any()):  # a Mul by ones is no pre-scale
            shape = [1, -1, 1, 1] if consumers[0].op in ("Conv", "ConvTranspose") else [-1]
            prescale = quantizer.dilation.reciprocal().reshape(shape).numpy().astype(np.float32)
        insert_activation_qdq(graph, group, index, consumers, scale, zero_point, quantizer.fmt.symmetric, prescale,
                              per_consumer=config.profile == "ort-cpu", unsigned=unsigned)  # fmt: skip
    if not config.fp32:
        to_float16(graph)
    compact(graph)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    del model.graph.value_info[:]  # inferred shapes: not needed to run, and they cost bytes in every bucket graph
    if config.profile == "tensorrt":  # ONNX Runtime's integer kernels take int8 weights only
        pack_int4_weights(model, {row["layer"] for row in plan if row["weight_bits"] == 4})
    return model


def set_bucket(model, bucketed, bucket: int, metadata: dict[str, str]) -> None:
    """Write bucket k's activation scales and asymmetric zero points, and the graph's metadata, into `model`."""
    from onnx import numpy_helper

    quantizers = list(bucketed.denoiser.act_quantizers().values())
    for initializer in model.graph.initializer:
        for prefix, attribute in ((ACT_SCALE, "step"), (ACT_ZERO_POINT, "zero_point")):
            if initializer.name.startswith(prefix):
                quantizer = quantizers[int(initializer.name[len(prefix):])]
                value = getattr(quantizer, attribute)[bucket].item()
                dtype = numpy_helper.to_array(initializer).dtype
                initializer.CopyFrom(numpy_helper.from_array(np.array(value, dtype=dtype), initializer.name))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=f"dilatequant.{key}", value=value)


def save_with_shared_weights(model, path: Path) -> None:
    """Save with every initializer in WEIGHTS_FILE except the per-bucket activation scales and zero points,
    which stay inside the graph: later bucket graphs rewrite only those and reference the same file."""
    from onnx import external_data_helper

    onnx, _ = require_onnx()
    external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True, location=WEIGHTS_FILE,
                                                        size_threshold=0)  # fmt: skip
    for initializer in model.graph.initializer:  # an external reference costs more than a few bytes of data
        if initializer.name.startswith((ACT_SCALE, ACT_ZERO_POINT)) or len(initializer.raw_data) <= 64:
            initializer.data_location = onnx.TensorProto.DEFAULT
            del initializer.external_data[:]
    onnx.save_model(model, str(path))


def check_inputs(artifact, table: BucketTable) -> CalibrationData:
    """The first CHECK_SAMPLES_PER_BUCKET calibration inputs of every bucket (the data is in random order)."""
    data = artifact.calibration_data()
    buckets = table.buckets_of(data.t)
    rows = torch.cat([(buckets == k).nonzero().flatten()[:CHECK_SAMPLES_PER_BUCKET] for k in range(len(table))])
    return CalibrationData(data.x[rows], data.t[rows], data.labels[rows])


def model_fields(loaded, calibrated_range: tuple[int, int]) -> dict:
    """What a runtime needs to sample through the graphs without the torch model: the model's family and
    config (conditioning, shapes), its scheduler config, and the timestep range the scales were calibrated on."""
    return {"model": {**loaded.denoiser.spec.to_dict(), "scheduler_config": loaded.scheduler_config},
            "calibrated_range": list(calibrated_range)}  # fmt: skip


def export(calib: str | Path, config: ExportConfig, out: str | Path) -> Path:
    """Export a calibration artifact to K bucket graphs in `out` (written atomically)."""
    onnx, _ = require_onnx()
    out = Path(out)
    check_replaceable(out, KIND)
    artifact = load_artifact(calib)
    check_exportable(artifact)
    table, estimated = choose_buckets(artifact.record.timesteps, artifact.act_steps(), config.buckets, config.auto_tolerance)
    source_sha = sha256_file(Path(calib) / MANIFEST_NAME)
    files = {f"bucket_{k}": f"bucket_{k}.onnx" for k in range(len(table))}
    fields = {"config": config.to_dict(), "profile": config.profile, "precision": "fp32" if config.fp32 else "fp16", "n_buckets": len(table),
              "buckets": table.to_dict(), "graphs": files, "weights_file": WEIGHTS_FILE, "check_inputs": CHECK_INPUTS_FILE,
              "estimated_error_by_k": {str(k): v for k, v in estimated.items()},
              "source": {"calibration": str(calib), "manifest_sha256": source_sha, "bits": artifact.config.bits_name}}  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        graph, nodes = fp_graph(artifact, config, Path(work))
        quantized_outputs = output_quantized_layers(graph, nodes, config.profile)
        bucketed = bucketed_model(artifact, table, quantized_outputs=quantized_outputs, scales=config.scales)
        template = quantize_graph(graph, nodes, artifact, bucketed, config)
    # the bucketed model's spec and scheduler: `artifact.model` would rebuild the fake-quant model once more
    fields.update(quantized_outputs=sorted(quantized_outputs), **model_fields(bucketed, (table.grid[0], table.grid[-1])))
    with staged_directory(out, KIND, FORMAT_VERSION, fields) as staging:
        (staging / CHECK_INPUTS_FILE).write_bytes(check_inputs(artifact, table).to_bytes())
        for k, (low, high) in enumerate(table.ranges()):
            metadata = {"bucket": str(k), "timestep_range": f"{low}-{high}", "profile": config.profile,
                        "source_artifact_sha256": source_sha, "version": library_versions()["dilatequant"]}  # fmt: skip
            set_bucket(template, bucketed, k, metadata)
            if k == 0:
                save_with_shared_weights(template, staging / files["bucket_0"])
                template = onnx.load(str(staging / files["bucket_0"]), load_external_data=False)
            else:
                onnx.save_model(template, str(staging / files[f"bucket_{k}"]))
    return out


def export_unquantized(model: str | Path, precision: str, out: str | Path) -> Path:
    """The unquantized baseline: one graph for every timestep, in the layout of a bucketed export (so that
    engines are built and profiled from it like from any other export)."""
    onnx, gs = require_onnx()
    if precision not in ("fp32", "fp16"):
        raise UserError(f"--precision {precision} is not an unquantized precision; choose fp32 or fp16.")
    check_replaceable(Path(out), KIND)
    loaded = load_model(model)
    with tempfile.TemporaryDirectory() as work:
        export_fp_graph(loaded.denoiser, Path(work) / "fp.onnx", ExportConfig().opset)
        graph = simplify(onnx.load(str(Path(work) / "fp.onnx")))
    # nodes named after their layers, so other tools can address them (e.g. quantize_static's nodes_to_exclude)
    name_layer_nodes(graph, [layer for group in input_groups(loaded.denoiser.model) for layer in group.layers])
    if precision == "fp16":
        to_float16(graph)
    compact(graph)
    template = gs.export_onnx(graph.cleanup().toposort())
    del template.graph.value_info[:]
    return export_single_graph(template, loaded, "unquantized", precision, out)


def export_single_graph(model, loaded, profile: str, precision: str, out: str | Path, source: dict | None = None) -> Path:
    """Write one graph (an onnx ModelProto, for every timestep) as a one-bucket export directory: the FP
    baseline, or a graph quantized by another tool (`profile` names it) that engines and profile then take."""
    out = Path(out)
    check_replaceable(out, KIND)
    steps = loaded.scheduler_config.get("num_train_timesteps", 1000)
    table = BucketTable(grid=(0,), starts=(0,), num_train_timesteps=steps)
    source = {"model": loaded.source, "model_dir": str(loaded.model_dir), **(source or {})}
    fields = {"config": {"precision": precision}, "profile": profile, "precision": precision, "n_buckets": 1,
              "buckets": table.to_dict(), "graphs": {"bucket_0": "bucket_0.onnx"}, "weights_file": WEIGHTS_FILE,
              "quantized_outputs": [], "source": source, **model_fields(loaded, (0, steps - 1))}  # fmt: skip
    metadata = {"bucket": "0", "timestep_range": f"0-{steps - 1}", "profile": profile, "precision": precision,
                "version": library_versions()["dilatequant"]}  # fmt: skip
    with staged_directory(out, KIND, FORMAT_VERSION, fields) as staging:
        del model.metadata_props[:]
        for key, value in metadata.items():
            model.metadata_props.add(key=f"dilatequant.{key}", value=value)
        save_with_shared_weights(model, staging / "bucket_0.onnx")
    return out


def describe(path: str | Path) -> dict:
    """The `inspect` summary of an export directory; verifies every checksum on the way."""
    from dilatequant.core.manifest import read_manifest

    path = Path(path)
    manifest = read_manifest(path, KIND, FORMAT_VERSION)
    return {
        "kind": KIND, "path": str(path), "format_version": manifest["format_version"], "checksums_verified": True,
        "profile": manifest["profile"], "precision": manifest["precision"], "n_buckets": manifest["n_buckets"],
        "ranges": manifest["buckets"]["ranges"], "graphs": manifest["graphs"], "weights_file": manifest["weights_file"],
        "total_bytes": sum(f["bytes"] for f in manifest["files"].values()), "source": manifest["source"],
    }  # fmt: skip
