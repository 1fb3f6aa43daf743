"""TensorRT engines through polygraphy: one strongly typed engine per bucket graph, all sharing one timing cache.

    ENGINES/bucket_<k>.plan          the serialized engine (weight-stripped with strip_weights: refitted at load from
                                     the export it was built from, whose checksums are verified first)
    ENGINES/bucket_<k>.layers.json   the engine inspector's report of every layer (detailed profiling verbosity)
    ENGINES/bucket_<k>.fusion.json   the Q/DQ fusion audit read from it: Q/DQ left as layers of their own, INT8 layers
    ENGINES/timing.cache             TensorRT's tactic timing cache, loaded before and saved after every bucket

Written for TensorRT 10 and 11 and polygraphy 0.49+, and not yet run against TensorRT: it cannot be installed on
the machines this project is developed on (its `tensorrt`-marked tests skip there). tensorrt and polygraphy are
imported on first use: importing this module needs neither, and a use that needs them raises
MissingDependencyError naming the `tensorrt` extra.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import sys
import tempfile
import weakref
from importlib import metadata
from pathlib import Path

import numpy as np

from dilatequant.core.errors import UserError
from dilatequant.core.manifest import MANIFEST_NAME, ArtifactError, sha256_file
from dilatequant.core.optional import require
from dilatequant.export.contract import BATCH_DIM, INPUT_NAMES, OUTPUT_NAME, TOKENS_DIM, read_export_manifest

from .backend import BucketEngine, BuildContext
from .config import BuildConfig

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # min, opt, max

TIMING_CACHE = "timing.cache"
IMAGE_INPUT = INPUT_NAMES[0]  # x: [batch, C, H, W], the input whose H and W --dynamic-resolution frees
UNKNOWN_GPU = "unknown GPU"
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
QDQ_LAYER_TYPES = frozenset({"Quantize", "Dequantize"})
ONNX_LAYER = re.compile(r"\[ONNX Layer: (.*?)\]")  # the layer's ONNX nodes, in the 'Metadata' of a detailed report
INT8 = re.compile(r"\bint8\b", re.IGNORECASE)  # 'Int8', 'INT8' (not 'UInt8') in a tensor's format or data type


def plan_file(bucket: str) -> str:
    return f"{bucket}.plan"


def layers_file(bucket: str) -> str:
    return f"{bucket}.layers.json"


def audit_file(bucket: str) -> str:
    return f"{bucket}.fusion.json"


def require_tensorrt():
    """tensorrt and polygraphy's TensorRT backend, imported on first use."""
    return require("tensorrt", "TensorRT engines", "tensorrt"), require("polygraphy.backend.trt", "TensorRT engines", "tensorrt")


def load_graph_structure(path: Path):
    """An ONNX graph without its external weights: inputs, node names and op types are all that is read here."""
    return require("onnx", "TensorRT engines", "export").load(str(path), load_external_data=False).graph


def shape_profile(graph_path: str | Path, config: BuildConfig) -> dict[str, ShapeRange]:
    """(min, opt, max) shape of every input of an ONNX graph: dims named 'batch' over config's batch range, cond's
    'tokens' over its token range, x's height and width over min_size..max_size with dynamic_resolution, every other
    dim as the graph fixes it."""
    profile = {}
    for tensor in load_graph_structure(Path(graph_path)).input:
        dims = [dim_range(graph_path, tensor.name, axis, dim, config) for axis, dim in enumerate(tensor.type.tensor_type.shape.dim)]
        profile[tensor.name] = tuple(tuple(dim[i] for dim in dims) for i in range(3))
    return profile


def dim_range(graph_path: str | Path, name: str, axis: int, dim, config: BuildConfig) -> tuple[int, int, int]:
    """(min, opt, max) of one input dimension (an ONNX TensorShapeProto.Dimension)."""
    if dim.dim_param == BATCH_DIM:
        return config.min_batch, config.opt_batch, config.max_batch
    if dim.dim_param == TOKENS_DIM:
        return config.min_tokens, config.opt_tokens, config.max_tokens
    fixed = dim.HasField("dim_value")
    if config.dynamic_resolution and name == IMAGE_INPUT and axis >= 2:
        if fixed:  # a profile cannot free a dimension the network fixes: TensorRT rejects it
            raise UserError(f"--dynamic-resolution needs graphs whose input {name} has a free height and width, but {graph_path} "
                            f"fixes {name}'s dimension {axis} at {dim.dim_value}. Build without --dynamic-resolution.")  # fmt: skip
        return config.min_size, config.max_size, config.max_size  # tuned for the largest: full-resolution sampling
    if not fixed:
        raise UserError(f"{graph_path}: input {name} has a free dimension {axis} ('{dim.dim_param}'); engines take a free "
                        f"'{BATCH_DIM}' and '{TOKENS_DIM}' (and, with --dynamic-resolution, a free height and width of {IMAGE_INPUT}) only. "
                        "Re-export the model.")  # fmt: skip
    return (dim.dim_value,) * 3


def engine_loader(graph: Path, shapes: dict[str, ShapeRange], config: BuildConfig, cache: Path, plan: Path):
    """polygraphy's lazy loader chain: ONNX -> strongly typed network -> engine saved to `plan`, `cache` updated."""
    trt, polygraphy_trt = require_tensorrt()
    profile = polygraphy_trt.Profile()
    for name, (low, opt, high) in shapes.items():
        profile.add(name, min=low, opt=opt, max=high)
    # TF32 stays off (polygraphy's default; trtexec --noTF32): FP32 tensors are the ones the export kept from FP16 on purpose.
    # strip_plan is STRIP_PLAN, which implies refitting with identical weights (trtexec --stripWeights); with refittable
    # (REFIT) any weights can be refitted, as with trtexec --stripWeights --refit.
    builder_config = polygraphy_trt.CreateConfig(
        profiles=[profile], load_timing_cache=str(cache) if cache.exists() else None, refittable=config.refittable,
        builder_optimization_level=config.optimization_level, strip_plan=config.strip_weights,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED)  # fmt: skip
    # Strongly typed: every tensor keeps the graph's type (FP16 / FP32 / INT8 between Q and DQ). TensorRT 10 needs the flag
    # (weak typing, deprecated since 10.12, lets the builder pick precisions); 11 types every network strongly and ignores it.
    network = polygraphy_trt.NetworkFromOnnxPath(str(graph), strongly_typed=True)
    build = polygraphy_trt.EngineFromNetwork(network, builder_config, save_timing_cache=str(cache))  # merged into the file
    return polygraphy_trt.SaveEngine(build, str(plan))


def engine_information(engine, shapes: dict[str, ShapeRange]) -> dict:
    """The engine inspector's JSON report of every layer, seen through an execution context at the opt shapes: without
    one TensorRT leaves out the formats and data types of every tensor that depends on the dynamic batch."""
    trt, _ = require_tensorrt()
    context = engine.create_execution_context()
    for name, (_, opt, _) in shapes.items():
        context.set_input_shape(name, opt)
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def layer_onnx_nodes(layer: dict) -> list[str]:
    """The ONNX nodes a layer implements: from its metadata, else from its name ('a + b' for fused nodes)."""
    return ONNX_LAYER.findall(layer.get("Metadata", "")) or layer["Name"].split(" + ")


def is_lone_qdq(layer: dict, op_types: dict[str, str]) -> bool:
    """A layer that only quantizes or dequantizes: its Q/DQ nodes fused into no compute layer."""
    if layer.get("ParameterType", layer.get("LayerType")) in QDQ_LAYER_TYPES:
        return True
    return all(op_types.get(node) in QDQ_OPS for node in layer_onnx_nodes(layer))


def reads_int8(layer: dict) -> bool:
    """Whether a layer takes an INT8 tensor. TensorRT 10 reports a tensor's 'Format/Datatype' ('Row major linear Int8
    format'); TensorRT 11 splits it into a 'Format' and a data type field."""
    return any(INT8.search(str(value)) for tensor in layer.get("Inputs", []) for key, value in tensor.items()
               if "datatype" in key.lower())  # fmt: skip


def fusion_audit(information: dict, op_types: dict[str, str]) -> dict:
    """Q/DQ fusion of one engine from its inspector report and its graph's op type by node name: the layers left doing
    nothing but quantize or dequantize (unfused), and the layers that read INT8 tensors (the quantized compute)."""
    layers = information["Layers"]
    lone = [is_lone_qdq(layer, op_types) for layer in layers]
    unfused = [layer["Name"] for layer, qdq in zip(layers, lone) if qdq]
    int8 = [layer["Name"] for layer, qdq in zip(layers, lone) if not qdq and reads_int8(layer)]
    return {"layers": len(layers), "int8_layers": len(int8), "unfused_qdq": len(unfused), "int8_layer_names": int8,
            "unfused_qdq_layer_names": unfused}  # fmt: skip


def write_layer_report(engine, shapes: dict[str, ShapeRange], graph: Path, out: Path, bucket: str) -> dict:
    """Write a bucket's layer report and fusion audit into `out`; returns its manifest entry."""
    information = engine_information(engine, shapes)
    audit = fusion_audit(information, {node.name: node.op_type for node in load_graph_structure(graph).node})
    (out / layers_file(bucket)).write_text(json.dumps(information, indent=1) + "\n")
    (out / audit_file(bucket)).write_text(json.dumps(audit, indent=1) + "\n")
    return {"layers": layers_file(bucket), "fusion_audit": audit_file(bucket), "int8_layers": audit["int8_layers"],
            "unfused_qdq": audit["unfused_qdq"]}  # fmt: skip


def gpu_name() -> str:
    """CUDA device 0's name, from the CUDA driver that TensorRT runs on; UNKNOWN_GPU without one."""
    try:
        cuda = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return UNKNOWN_GPU
    device, name = ctypes.c_int(), ctypes.create_string_buffer(256)
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), 0) or cuda.cuDeviceGetName(name, len(name), device):
        return UNKNOWN_GPU
    return name.value.decode()


def verified_export(export_dir: Path, manifest_sha256: str) -> dict:
    """The manifest of the export that weight-stripped engines were built from, every checksum verified (at each load:
    the price of plans without weights): TensorRT refits them assuming the very weights they were built with."""
    try:
        manifest = read_export_manifest(export_dir)
    except ArtifactError as exc:
        raise ArtifactError(f"Weight-stripped engines take their weights from the export they were built from: {exc}") from exc
    if sha256_file(export_dir / MANIFEST_NAME) != manifest_sha256:
        raise ArtifactError(f"{export_dir} is no longer the export these weight-stripped engines were built from; rebuild them.")
    return manifest


def refit_from_export(engine, export_dir: Path, manifest_sha256: str, bucket: str) -> None:
    """Put the export's ONNX weights back into a weight-stripped engine of `bucket`."""
    trt, _ = require_tensorrt()
    graph = export_dir / verified_export(export_dir, manifest_sha256)["graphs"][bucket]
    logger = trt.Logger(trt.Logger.WARNING)
    refitter = trt.Refitter(engine, logger)
    if not (trt.OnnxParserRefitter(refitter, logger).refit_from_file(str(graph)) and refitter.refit_cuda_engine()):
        raise ArtifactError(f"TensorRT could not refit the weight-stripped engine of {bucket} from {graph}; rebuild the engines.")


class TensorRTEngine(BucketEngine):
    """One bucket's engine, run through polygraphy's TrtRunner: activated once, so that its execution context and
    device buffers serve every run; deactivated by `close` (or when this object is collected)."""

    def __init__(self, name: str, engine) -> None:
        super().__init__(name)
        trt, polygraphy_trt = require_tensorrt()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_dtypes = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name))) for name in names
                             if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT}  # fmt: skip
        self.runner = polygraphy_trt.TrtRunner(engine)
        weakref.finalize(self, self.close)

    def _activate(self) -> None:
        self.runner.activate()

    def _close(self) -> None:
        self.runner.deactivate()

    def _infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.runner.infer(feeds)[OUTPUT_NAME].astype(np.float32)  # a copy: the runner reuses its output buffers


class TensorRTBackend:
    name = "tensorrt"

    def version(self) -> str:
        trt, _ = require_tensorrt()
        return trt.__version__

    def device(self, config: BuildConfig) -> str:
        return gpu_name()

    def build(self, context: BuildContext) -> dict:
        graphs = {key: context.export_dir / name for key, name in context.export_manifest["graphs"].items()}
        shapes = {key: shape_profile(graph, context.config) for key, graph in graphs.items()}  # refused before any build
        reports = {}
        with tempfile.TemporaryDirectory() as work:
            cache = Path(work) / TIMING_CACHE  # not built in staging: polygraphy leaves a '.lock' file beside it
            for key, graph in graphs.items():
                engine = engine_loader(graph, shapes[key], context.config, cache, context.staging / plan_file(key))()
                reports[key] = write_layer_report(engine, shapes[key], graph, context.staging, key)
            shutil.copyfile(cache, context.staging / TIMING_CACHE)
        build = {"polygraphy": metadata.version("polygraphy"), "strongly_typed": True, "shapes": shapes}
        if context.config.strip_weights:
            build["weights_from"] = str(context.export_dir.resolve())
        return {"engines": {key: plan_file(key) for key in graphs}, "timing_cache": TIMING_CACHE, "layer_reports": reports,
                "tensorrt_build": build}  # fmt: skip

    def load(self, engine_dir: Path, manifest: dict, bucket: str) -> TensorRTEngine:
        device = gpu_name()
        if manifest["device"] != device:
            raise ArtifactError(f"{engine_dir} was built on {manifest['device']}; this machine has {device}. TensorRT engines "
                                "are specific to the GPU model: rebuild them here with `dilatequant build`.")  # fmt: skip
        _, polygraphy_trt = require_tensorrt()
        engine = polygraphy_trt.EngineFromBytes((engine_dir / manifest["engines"][bucket]).read_bytes())()
        if manifest["build"]["strip_weights"]:
            export_dir = Path(manifest["tensorrt_build"]["weights_from"])
            refit_from_export(engine, export_dir, manifest["source"]["manifest_sha256"], bucket)
        return TensorRTEngine(f"{engine_dir}/{manifest['engines'][bucket]}", engine)


BACKEND = TensorRTBackend()
