"""`export()`: calibration artifact in, one Q/DQ ONNX graph per timestep bucket out (sharing one weights file);
the directory's layout is export/contract.py's. `export_unquantized()`: the FP baseline in the same layout.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dilatequant.calibrate.contract import OUTPUT_SUFFIX, BucketScales, CalibrationData, bucket_scales, load_artifact
from dilatequant.core.attention import use_explicit_attention
from dilatequant.core.buckets import BucketTable
from dilatequant.core.denoiser import ModelSpec, load_model
from dilatequant.core.environment import library_versions
from dilatequant.core.errors import UserError
from dilatequant.core.external_data import external_location, point_to
from dilatequant.core.finite import require_finite
from dilatequant.core.manifest import MANIFEST_NAME, check_replaceable, fields_verified, sha256_file, staged_directory
from dilatequant.core.optional import require
from dilatequant.core.output import claim_output
from dilatequant.core.structure import input_groups

from .buckets import choose_buckets
from .compact import compact
from .config import ExportConfig
from .contract import CHECK_INPUTS_FILE, FORMAT_VERSION, KIND, WEIGHTS_FILE
from .graph import attention_inputs, compute_node_names, export_fp_graph, load_graph
from .matmul_nbits import add_domain, check_deployable, replace_linear
from .precision import to_float16
from .profiles import PROFILES, ExportProfile
from .qdq import ACT_SCALE, ACT_ZERO_POINT, BLOCKED_OPSET, blocked_weight_dq, has_blocked_dequantize, insert_activation_qdq, insert_output_qdq, pack_int4_weights, quantize_weights, raise_opset
from .simplify import simplify

CHECK_SAMPLES_PER_BUCKET = 4
EMBEDDED_BYTES = 64  # an initializer this small stays in the graph: an external reference costs about as much
ALIGNMENT = 64  # each tensor's offset in the weights file (cache lines: ONNX Runtime may use the mapped file as is)
COPY_CHUNK = 64 * 2**20
# ONNX Runtime fuses these into QLinearConv / QGemm only when their output is quantized too (measured, ORT 1.31)
FUSED_WITH_OUTPUT = ("Conv", "Gemm")


def require_onnx():
    return require("onnx", "ONNX export", "export"), require("onnx_graphsurgeon", "ONNX export", "export")


def check_exportable(artifact, profile: ExportProfile) -> None:
    """Refuse, naming the fix, what the profile's runtime cannot run."""
    config = artifact.config
    if config.act_bits != 8:
        raise UserError(f"{artifact.path} quantizes activations to {config.act_bits} bits; ONNX QuantizeLinear "
                        "graphs for TensorRT and ONNX Runtime take 8-bit activations. Calibrate with A8 (e.g. W4A8).")  # fmt: skip
    if config.quantize_attention and config.attention_head_tables:
        raise UserError(f"{artifact.path} quantizes attention inputs with one scale per head; ONNX Runtime's QLinearMatMul "
                        "and TensorRT's fused attention take one scale per tensor. Calibrate without --head-tables.")  # fmt: skip
    grouped = group_rows(artifact)
    if grouped and not profile.group_weights:
        raise UserError(f"{artifact.path} has group-wise weights (method '{config.method}'), which the {profile.name} profile "
                        f"cannot run; export with --profile {group_profiles()}.")  # fmt: skip
    if config.act_dynamic and not profile.dynamic_activations:
        raise UserError(f"{artifact.path} quantizes activations dynamically (per token and group, at run time); the "
                        f"{profile.name} profile has static scales only (TensorRT INT8 has no run-time activation "
                        f"quantization). Export with --profile {dynamic_profiles()}, or calibrate static tables "
                        "(--static-activations; --recipe q-dit-tensorrt for TensorRT).")  # fmt: skip
    if grouped:
        GROUP_FORMATS[profile.group_weights].check(artifact, grouped)


def group_rows(artifact) -> list[dict]:
    """quant_plan.json's rows of the group-wise layers (Q-DiT)."""
    return [row for row in artifact.quantized_layers() if row.get("group_size")]


def check_matmul_nbits(artifact, grouped: list[dict]) -> None:
    if artifact.config.act_dynamic and not artifact.config.act_symmetric:
        raise UserError(f"{artifact.path} has asymmetric dynamic activations; MatMulNBits quantizes its input symmetrically "
                        "(int8, zero point 0). Calibrate with symmetric activations.")  # fmt: skip
    for row in grouped:
        check_deployable(row["layer"], row["weight_bits"], row["group_size"])


def check_blocked_dq(artifact, grouped: list[dict]) -> None:
    if not artifact.config.weight_group_symmetric:
        raise UserError(f"{artifact.path} has asymmetric group-wise weights (a zero point per group); TensorRT's "
                        "block-quantized DequantizeLinear takes zero points of 0 only. Calibrate with --symmetric-groups "
                        "(--recipe q-dit-tensorrt), or export with --profile ort-dynamic.")  # fmt: skip
    for row in grouped:
        if row["weight_bits"] not in (4, 8):
            raise UserError(f"{row['layer']}: {row['weight_bits']}-bit group-wise weights have no TensorRT type; use 4 or 8 bits.")


def write_matmul_nbits(graph, node, artifact, row: dict) -> None:
    """MatMulNBits: with dynamic activations at accuracy_level 4 (int8 blocks of the input, the fake quantizer's
    symmetric dynamic grid), else weight-only (float input: the static Q/DQ before it, or none)."""
    layer = row["layer"]
    replace_linear(graph, node, layer, artifact.weight_step(layer).numpy(), artifact.weight_zero_point(layer).numpy(),
                   row["weight_bits"], artifact.config.weight_group_symmetric, 4 if artifact.config.act_dynamic else 0)  # fmt: skip


def write_blocked_dq(graph, node, artifact, row: dict) -> None:
    """Symmetric integers with a scale per (row, group) behind a block-quantized DequantizeLinear, feeding the GEMM."""
    blocked_weight_dq(graph, node, row["layer"], artifact.weight_step(row["layer"]).numpy(), row["weight_bits"])


@dataclass(frozen=True)
class GroupFormat:
    """How a profile writes group-wise layers (ExportProfile.group_weights): what it refuses, then the graph pass."""

    check: Callable[[object, list[dict]], None]
    write: Callable[[object, object, object, dict], None]


GROUP_FORMATS = {"matmulnbits": GroupFormat(check_matmul_nbits, write_matmul_nbits),
                 "blocked-dq": GroupFormat(check_blocked_dq, write_blocked_dq)}  # fmt: skip


def group_profiles() -> str:
    return " or ".join(name for name, profile in PROFILES.items() if profile.group_weights)


def dynamic_profiles() -> str:
    return " or ".join(name for name, profile in PROFILES.items() if profile.dynamic_activations)


def fp_graph(artifact, config: ExportConfig, work: Path):
    """The exported FP graph (onnx-graphsurgeon), its quantized layers' compute nodes and, when the artifact quantizes
    attention, each attention matmul input's (node, slot) (attention then exports explicitly, as calibrated).
    Weights the exporter wrote as external data stay in `work` until written out; the torch model is gone
    before the graph is read."""
    fp_path = work / "fp.onnx"
    attentions = export_model(artifact.path / "model", fp_path, config.opset, artifact.config.quantize_attention)
    graph = simplify(load_graph(fp_path), work)
    return graph, name_layer_nodes(graph, [row["layer"] for row in artifact.quantized_layers()]), attention_inputs(graph, attentions)


def export_model(model_dir: Path, path: Path, opset: int, explicit_attention: bool = False) -> list[str]:
    """torch.onnx.export of the model in `model_dir` to `path` (its attentions' names, exported explicitly when asked)."""
    denoiser = load_model(model_dir).denoiser
    attentions = use_explicit_attention(denoiser.model) if explicit_attention else []
    export_fp_graph(denoiser, path, opset)
    return attentions


def name_layer_nodes(graph, layers: list[str]) -> dict:
    """Rename each layer's Conv/Gemm/MatMul node after the layer (names survive compact()); layer -> node."""
    by_name = {node.name: node for node in graph.nodes}
    names = compute_node_names([(n.name, n.op) for n in graph.nodes], layers)
    for layer, name in names.items():
        by_name[name].name = layer
    return {layer: by_name[name] for layer, name in names.items()}


def output_quantized_layers(graph, nodes: dict, profile: ExportProfile, grouped: frozenset[str] = frozenset()) -> frozenset[str]:
    """Profiles that quantize fused outputs (ort-cpu): every quantized Conv/Gemm whose output is not the model's
    prediction (ONNX Runtime fuses them into integer kernels only with their output quantized, DESIGN.md §4),
    except group-wise layers (MatMulNBits has a float output). Others (tensorrt): none."""
    if not profile.quantize_fused_outputs:
        return frozenset()
    outputs = {tensor.name for tensor in graph.outputs}
    return frozenset(layer for layer, node in nodes.items()
                     if node.op in FUSED_WITH_OUTPUT and node.outputs[0].name not in outputs and layer not in grouped)  # fmt: skip


def quantize_graph(graph, nodes: dict, attention: dict, artifact, scales: BucketScales, config: ExportConfig):
    """The quantized graph with bucket 0's activation scales, as an onnx ModelProto (`attention`: fp_graph's)."""
    _, gs = require_onnx()
    plan = artifact.quantized_layers()
    grouped = group_rows(artifact)
    static = [row for row in plan if not row.get("group_size")]
    steps = {row["layer"]: artifact.weight_step(row["layer"]).numpy() for row in static}
    quantize_weights(graph, {row["layer"]: nodes[row["layer"]] for row in static}, steps, {row["layer"]: row["weight_bits"] for row in static})
    unsigned = config.target.unsigned_activations
    for index, (group, rows) in enumerate(scales.groups.items()):
        scale, zero_point = float(rows.steps[0]), int(rows.zero_points[0])
        if rows.output:
            insert_output_qdq(graph, group, index, nodes[group.removesuffix(OUTPUT_SUFFIX)], scale, zero_point,
                              rows.symmetric, unsigned)  # fmt: skip
            continue
        consumers, slot = ([attention[group][0]], attention[group][1]) if group in attention else \
            ([nodes[row["layer"]] for row in plan if row["group"] == group], 0)  # fmt: skip
        prescale = None
        if rows.prescale is not None:
            shape = [1, -1, 1, 1] if consumers[0].op in ("Conv", "ConvTranspose") else [-1]
            prescale = rows.prescale.reshape(shape)
        insert_activation_qdq(graph, group, index, consumers, scale, zero_point, rows.symmetric, prescale,
                              per_consumer=config.target.qdq_per_consumer, unsigned=unsigned, slot=slot)  # fmt: skip
    for row in grouped:
        GROUP_FORMATS[config.target.group_weights].write(graph, nodes[row["layer"]], artifact, row)
    if config.precision == "fp16":
        to_float16(graph)
    compact(graph)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    add_domain(model)
    if has_blocked_dequantize(model):
        raise_opset(model, BLOCKED_OPSET)
    del model.graph.value_info[:]  # inferred shapes: not needed to run, and they cost bytes in every bucket graph
    if config.target.pack_int4_weights:  # ONNX Runtime's integer kernels take int8 weights only
        pack_int4_weights(model, {row["layer"] for row in plan if row["weight_bits"] == 4})
    return model


def set_bucket(model, scales: BucketScales, bucket: int, metadata: dict[str, str]) -> None:
    """Write bucket k's activation scales and asymmetric zero points, and the graph's metadata, into `model`."""
    from onnx import numpy_helper

    tables = list(scales.groups.values())
    for initializer in model.graph.initializer:
        for prefix, attribute in ((ACT_SCALE, "steps"), (ACT_ZERO_POINT, "zero_points")):
            if initializer.name.startswith(prefix):
                value = getattr(tables[int(initializer.name[len(prefix):])], attribute)[bucket]
                dtype = numpy_helper.to_array(initializer).dtype
                initializer.CopyFrom(numpy_helper.from_array(np.array(value, dtype=dtype), initializer.name))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=f"dilatequant.{key}", value=value)


def save_with_shared_weights(model, path: Path, source_dir: Path | None = None) -> None:
    """Save with every initializer in WEIGHTS_FILE beside `path` except the per-bucket activation scales and zero
    points and tiny tensors, which stay inside the graph: later bucket graphs rewrite only those and reference the
    same file. Written tensor by tensor: an in-memory one moves from the proto to the file; one still in the
    exporter's external data (in `source_dir`) is copied file to file, never entering memory whole."""
    from onnx.external_data_helper import uses_external_data

    onnx, _ = require_onnx()
    with open(path.parent / WEIGHTS_FILE, "wb") as weights:
        for initializer in model.graph.initializer:
            external = uses_external_data(initializer)
            size = external_location(initializer, source_dir)[2] if external else len(initializer.raw_data)
            if initializer.name.startswith((ACT_SCALE, ACT_ZERO_POINT)) or (size is not None and size <= EMBEDDED_BYTES):
                if external:  # the exporter's external data of a tiny tensor: into the graph, like an in-memory one
                    initializer.raw_data = read_external(initializer, source_dir)
                    del initializer.external_data[:]
                    initializer.data_location = onnx.TensorProto.DEFAULT
                continue
            weights.write(b"\0" * (-weights.tell() % ALIGNMENT))
            offset = weights.tell()
            if external:
                copy_external(initializer, source_dir, weights)
            else:
                weights.write(initializer.raw_data)
            point_to(initializer, WEIGHTS_FILE, offset, weights.tell() - offset)
    onnx.save_model(model, str(path))


def external_chunks(tensor, source_dir: Path | None):
    """An external-data tensor's bytes, in chunks of at most COPY_CHUNK."""
    if source_dir is None:
        raise ValueError(f"initializer {tensor.name} is external data: pass the directory it is relative to")
    path, offset, length = external_location(tensor, source_dir)
    with open(path, "rb") as source:
        source.seek(offset)
        remaining = length if length is not None else path.stat().st_size - offset
        while remaining:
            chunk = source.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise ValueError(f"{path} ends before initializer {tensor.name}'s {length} bytes")
            yield chunk
            remaining -= len(chunk)


def copy_external(tensor, source_dir: Path | None, sink) -> None:
    for chunk in external_chunks(tensor, source_dir):
        sink.write(chunk)


def read_external(tensor, source_dir: Path | None) -> bytes:
    return b"".join(external_chunks(tensor, source_dir))


def attention_record(artifact, attention: dict) -> dict:
    """What the manifest says about attention: which matmul inputs carry Q/DQ and in what form the softmax deployed."""
    softmax, tables = artifact.config.softmax_quantizer, "per-bucket tables" if artifact.config.tpq else "one table"
    return {"quantized_inputs": sorted(attention),
            "softmax": None if not attention else f"uniform, {tables}" if softmax == "uniform" else
            f"calibrated {softmax}, deployed uniform ({tables}, from the calibration data: no runtime has a log-domain "
            "kernel)"}  # fmt: skip


def check_inputs(artifact, table: BucketTable) -> CalibrationData:
    """The first CHECK_SAMPLES_PER_BUCKET calibration inputs of every bucket (the data is in random order)."""
    data = artifact.calibration_data()
    buckets = torch.from_numpy(table.buckets_of(data.t))
    rows = torch.cat([(buckets == k).nonzero().flatten()[:CHECK_SAMPLES_PER_BUCKET] for k in range(len(table))])
    return CalibrationData(data.x[rows], data.t[rows], data.labels[rows], prompts=data.prompts)  # labels index the prompts' rows


def model_fields(spec: ModelSpec, scheduler_config: dict, calibrated_range: tuple[int, int]) -> dict:
    """What a runtime needs to sample through the graphs without the torch model: the model's family and
    config (conditioning, shapes), its scheduler config, and the timestep range the scales were calibrated on."""
    return {"model": {**spec.to_dict(), "scheduler_config": scheduler_config}, "calibrated_range": list(calibrated_range)}


def export(calib: str | Path, config: ExportConfig, out: str | Path, progress: bool = True) -> Path:
    """Export a calibration artifact to K bucket graphs in `out` (claimed meanwhile, written atomically)."""
    require_onnx()
    out = Path(out)
    check_replaceable(out, KIND)
    artifact = load_artifact(calib)
    check_exportable(artifact, config.target)
    with claim_output(out, notify=tqdm.write if progress else None):
        return write_export(artifact, Path(calib), config, out, progress)


def write_export(artifact, calib: Path, config: ExportConfig, out: Path, progress: bool) -> Path:
    onnx, _ = require_onnx()

    say = tqdm.write if progress else (lambda message: None)
    table, estimated = choose_buckets(artifact.record.timesteps, artifact.act_steps(), config.buckets, config.auto_tolerance)
    source_sha = sha256_file(calib / MANIFEST_NAME)
    files = {f"bucket_{k}": f"bucket_{k}.onnx" for k in range(len(table))}
    fields = {"config": config.to_dict(), "profile": config.profile, "precision": config.precision, "n_buckets": len(table),
              "buckets": table.to_dict(), "graphs": files, "weights_file": WEIGHTS_FILE, "check_inputs": CHECK_INPUTS_FILE,
              "estimated_error_by_k": {str(k): v for k, v in estimated.items()},
              "source": {"calibration": str(calib), "manifest_sha256": source_sha, "bits": artifact.config.bits_name,
                         "model": artifact.record.source["spec"]}}  # fmt: skip
    with tempfile.TemporaryDirectory() as work:  # the exporter's external data, until copied into the weights file
        say(f"export: tracing the FP graph of {calib} ({config.profile}, {len(table)} buckets)")
        graph, nodes, attention = fp_graph(artifact, config, Path(work))
        quantized_outputs = output_quantized_layers(graph, nodes, config.target, frozenset(row["layer"] for row in group_rows(artifact)))
        say("export: activation scales per bucket, from the calibration data")
        scales = bucket_scales(artifact, table, quantized_outputs=quantized_outputs, scales=config.scales)
        say("export: Q/DQ graph")
        template = quantize_graph(graph, nodes, attention, artifact, scales, config)
        del graph, nodes  # the template holds what is left of them
        require_finite(embedded_arrays(template), "The exported graph",
                       f"Its initializers come from {calib}: re-calibrate, or check the model for NaN/Inf weights.")  # fmt: skip
        fields.update(quantized_outputs=sorted(quantized_outputs), attention=attention_record(artifact, attention),
                      **model_fields(scales.spec, scales.scheduler_config, (table.grid[0], table.grid[-1])))  # fmt: skip
        with staged_directory(out, KIND, FORMAT_VERSION, fields) as staging:
            (staging / CHECK_INPUTS_FILE).write_bytes(check_inputs(artifact, table).to_bytes())
            for k, (low, high) in enumerate(tqdm(table.ranges(), desc="write bucket graphs", unit="graph", disable=not progress)):
                metadata = {"bucket": str(k), "timestep_range": f"{low}-{high}", "profile": config.profile,
                            "source_artifact_sha256": source_sha, "version": library_versions()["dilatequant"]}  # fmt: skip
                set_bucket(template, scales, k, metadata)
                if k == 0:
                    save_with_shared_weights(template, staging / files["bucket_0"], Path(work))
                else:
                    onnx.save_model(template, str(staging / files[f"bucket_{k}"]))
    return out


def embedded_arrays(model) -> dict[str, np.ndarray]:
    """The initializers held in the graph proto (what export computed: integer weights, scales, float16 weights). The
    exporter's external data is the model's FP32 weights, which load_model found finite."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if not uses_external_data(i)}


def export_unquantized(model: str | Path, precision: str, out: str | Path) -> Path:
    """The unquantized baseline: one graph for every timestep, in the layout of a bucketed export (so that
    engines are built and profiled from it like from any other export)."""
    onnx, gs = require_onnx()
    if precision not in ("fp32", "fp16"):
        raise UserError(f"--precision {precision} is not an unquantized precision; choose fp32 or fp16.")
    check_replaceable(Path(out), KIND)
    loaded = load_model(model)
    layers = [layer for group in input_groups(loaded.denoiser.model) for layer in group.layers]
    with tempfile.TemporaryDirectory() as work:  # the exporter's external data, until copied into the weights file
        export_fp_graph(loaded.denoiser, Path(work) / "fp.onnx", ExportConfig().opset)
        loaded.denoiser.to("meta")  # the weights are in the graph now; the module keeps the config (spec) the manifest needs
        graph = simplify(load_graph(Path(work) / "fp.onnx"), Path(work))
        # nodes named after their layers, so other tools can address them (e.g. quantize_static's nodes_to_exclude)
        name_layer_nodes(graph, layers)
        if precision == "fp16":
            to_float16(graph)
        compact(graph)
        template = gs.export_onnx(graph.cleanup().toposort())
        del graph, template.graph.value_info[:]
        return export_single_graph(template, loaded, "unquantized", precision, out, source_dir=Path(work))


def export_single_graph(model, loaded, profile: str, precision: str, out: str | Path, source: dict | None = None,
                        source_dir: Path | None = None) -> Path:  # fmt: skip
    """Write one graph (an onnx ModelProto, for every timestep) as a one-bucket export directory: the FP
    baseline, or a graph quantized by another tool (`profile` names it) that engines and profile then take;
    `source_dir`: where the external data of `model`, if any, lies."""
    out = Path(out)
    check_replaceable(out, KIND)
    steps = loaded.scheduler_config.get("num_train_timesteps", 1000)
    table = BucketTable(grid=(0,), starts=(0,), num_train_timesteps=steps)
    source = {"model": loaded.source, "model_dir": str(loaded.model_dir), **(source or {})}
    fields = {"config": {"precision": precision}, "profile": profile, "precision": precision, "n_buckets": 1,
              "buckets": table.to_dict(), "graphs": {"bucket_0": "bucket_0.onnx"}, "weights_file": WEIGHTS_FILE,
              "quantized_outputs": [], "source": source,
              **model_fields(loaded.denoiser.spec, loaded.scheduler_config, (0, steps - 1))}  # fmt: skip
    metadata = {"bucket": "0", "timestep_range": f"0-{steps - 1}", "profile": profile, "precision": precision,
                "version": library_versions()["dilatequant"]}  # fmt: skip
    with staged_directory(out, KIND, FORMAT_VERSION, fields) as staging:
        del model.metadata_props[:]
        for key, value in metadata.items():
            model.metadata_props.add(key=f"dilatequant.{key}", value=value)
        save_with_shared_weights(model, staging / "bucket_0.onnx", source_dir)
    return out


def describe(path: str | Path) -> dict:
    """The `inspect` summary of an export directory; verifies every checksum on the way."""
    from dilatequant.core.manifest import read_manifest

    path = Path(path)
    manifest = read_manifest(path, KIND, FORMAT_VERSION)
    return {
        "kind": KIND, "path": str(path), "format_version": manifest["format_version"], "checksums_verified": True, "manifest_fields_verified": fields_verified(manifest),
        "profile": manifest["profile"], "precision": manifest["precision"], "n_buckets": manifest["n_buckets"],
        "ranges": manifest["buckets"]["ranges"], "graphs": manifest["graphs"], "weights_file": manifest["weights_file"],
        "total_bytes": sum(f["bytes"] for f in manifest["files"].values()), "source": manifest["source"],
        "attention": manifest.get("attention"),  # absent in exports written before attention was exported
    }  # fmt: skip
