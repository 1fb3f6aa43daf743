"""The fidelity gate: does a built engine compute what its graph specifies?

An optimizer replaces Q/DQ patterns by fused integer kernels, and a fused kernel is right only if it computes
the same integers. Example (issue 11): ONNX Runtime's u8s8 kernels on x86 CPUs without VNNI add pairs of
u8 x s8 products into a saturating int16 (vpmaddubsw); with zero point 128 the activation codes sit around 128
and weight-dilated layers hold many weights near +-127, so one pair reaches 2 * 255 * 127 = 64,770, twice
the int16 range, and the engine drifts while the graph is right.

Every bucket is checked on recorded calibration inputs (the export's `check_inputs.safetensors`; seeded
stand-ins for exports without them) against the *reference*: the same graph run op by op by ONNX Runtime
with graph optimizations off (QuantizeLinear and DequantizeLinear as the ONNX spec defines them):
- **layers** (the gate): every quantized layer on its own — its Q/DQ -> layer -> Q/DQ chain fed the
  reference's input tensor, optimized the way the engine is, against the same chain run op by op. A correct
  kernel differs only where its requantization rounds an output code the other way (measured: 1.1-2.3e-3
  relative error); a saturating one by 0.11-0.29, and the worst layer is named with its kernel, shapes and
  code ranges.
- **end to end**: the whole engine against the reference. Single code flips compound through the network
  (digits W8A8, 4 buckets, on a correct build: 0.6-2.3 %; a random-weight UNet: 8-9 %), so this number
  informs and fails the build only beyond END_TO_END_BOUND (a broken engine file, a wrong multi-node fusion).

Memory stays bounded at SDXL size: the graphs are read without their weights (ONNX Runtime reads them from the
export's weights file), and the layers are checked in chunks whose reference tensors fit CHUNK_BYTES (an SDXL-size
UNet's layer inputs for two samples take 11.6 GiB: 6 chunks); each chunk costs one more reference run.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# ops an optimizer puts between a fused kernel and the chain's DequantizeLinear output
PASS_THROUGH = {"DequantizeLinear", "QuantizeLinear", "Transpose", "Reshape", "ReorderInput", "ReorderOutput"}
SAMPLES_PER_BUCKET = 4
INT16_MAX = 32767
CHUNK_BYTES = 2 * 2**30


@dataclass(frozen=True)
class LayerFidelity:
    """One quantized layer run alone: its kernel in the engine and how far that kernel is from the reference."""

    layer: str
    kernel: str  # the op that computes the layer after optimization, e.g. QLinearConv, QGemm, Conv (float)
    rel_error: float
    input_shape: list[int]
    weight_shape: list[int]
    input_codes: list[int]  # [min, max] of the layer's quantized input codes on the check inputs
    weight_absmax: int
    weights_beyond_7bit: float  # share of weight codes outside [-64, 64]

    @property
    def int16_pair_peak(self) -> int:
        """The largest sum of two adjacent code products a u8s8 kernel may form (vpmaddubsw's int16 pairs)."""
        return 2 * max(abs(c) for c in self.input_codes) * self.weight_absmax

    def describe(self) -> str:
        pair = f"; u8s8 pair peak {self.int16_pair_peak} vs int16 {INT16_MAX}" if self.int16_pair_peak > INT16_MAX else ""
        return (f"{self.layer} ({self.kernel}, input {self.input_shape}, weight {self.weight_shape}, input codes "
                f"{self.input_codes[0]}..{self.input_codes[1]}, |weight| <= {self.weight_absmax}, "
                f"{self.weights_beyond_7bit:.0%} of weights beyond 7 bits{pair}): relative error {self.rel_error:.2e}")  # fmt: skip


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return float(np.linalg.norm(value.astype(np.float64) - reference) / max(np.linalg.norm(reference), 1e-12))


@dataclass(frozen=True)
class QuantizedLayer:
    name: str
    source: str  # the float tensor its activation QuantizeLinear reads
    codes: str  # that QuantizeLinear's output
    weight: str  # the weight initializer behind its DequantizeLinear
    output: str  # its output, after the output Q/DQ where it has one


def quantized_layers(model) -> list[QuantizedLayer]:
    """Every Conv/Gemm/MatMul whose input comes through QuantizeLinear -> DequantizeLinear and whose weight is a
    dequantized initializer, in graph order."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def produced_by(name: str, op: str):
        node = producers.get(name)
        return node if node is not None and node.op_type == op else None

    layers = []
    for node in graph.node:
        if node.op_type not in QUANTIZABLE or len(node.input) < 2:
            continue
        act_dq, weight_dq = produced_by(node.input[0], "DequantizeLinear"), produced_by(node.input[1], "DequantizeLinear")
        act_q = produced_by(act_dq.input[0], "QuantizeLinear") if act_dq is not None else None
        if act_q is None or weight_dq is None or weight_dq.input[0] not in initializers:
            continue
        output = node.output[0]
        after = consumers.get(output, [])
        if len(after) == 1 and after[0].op_type == "QuantizeLinear":
            dq = consumers.get(after[0].output[0], [])
            output = dq[0].output[0] if len(dq) == 1 and dq[0].op_type == "DequantizeLinear" else output
        layers.append(QuantizedLayer(node.name or output, act_q.input[0], act_q.output[0], weight_dq.input[0], output))
    return layers


def with_outputs(model, names: list[str]):
    """A copy of `model` that also outputs the tensors `names` (untyped: ONNX Runtime infers their types)."""
    import onnx

    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {o.name for o in extended.graph.output}
    extended.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in present)
    return extended


def chain(model, producers: dict, initializers: dict, source: str, output: str) -> list:
    """The nodes (in graph order) that compute `output` from `source` and initializers."""
    needed, pending = set(), [output]
    while pending:
        name = pending.pop()
        if name and name != source and name not in initializers and id(producers[name]) not in needed:
            needed.add(id(producers[name]))
            pending.extend(producers[name].input)
    return [node for node in model.graph.node if id(node) in needed]


def prefixed(prefix: str, names) -> list[str]:
    return [prefix + name if name else name for name in names]  # '' marks an omitted optional input


def isolated_layers(model, layers: list[QuantizedLayer], source_types: dict[str, int]):
    """One model holding every layer's chain (source -> Q/DQ -> layer -> Q/DQ -> output) side by side, each
    with its own input 'L<i>/<source>' and output 'L<i>/<output>', so one session runs them all in isolation."""
    import onnx
    from onnx import helper

    initializers = {i.name: i for i in model.graph.initializer}
    producers = {name: node for node in model.graph.node for name in node.output}
    graph = helper.make_graph([], "isolated_layers", [], [])
    for i, layer in enumerate(layers):
        prefix = f"L{i}/"
        for node in chain(model, producers, initializers, layer.source, layer.output):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = prefix + (node.name or node.output[0])
            copy.input[:], copy.output[:] = prefixed(prefix, node.input), prefixed(prefix, node.output)
            graph.node.append(copy)
            for name in node.input:
                if name in initializers:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(initializers[name])
                    tensor.name = prefix + name
                    graph.initializer.append(tensor)
        graph.input.append(helper.make_tensor_value_info(prefix + layer.source, source_types[layer.source], None))
        graph.output.append(helper.make_empty_tensor_value_info(prefix + layer.output))
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def fused_kernel(optimized, output: str) -> str:
    """The op computing `output` in an optimized graph: walk back through Q/DQ and layout nodes."""
    producers = {name: node for node in optimized.graph.node for name in node.output}
    node = producers.get(output)
    while node is not None and node.op_type in PASS_THROUGH:
        node = producers.get(node.input[0])
    return "none" if node is None else node.op_type


def layer_statistics(layer: QuantizedLayer, initializers: dict, tensors: dict[str, np.ndarray], weights_dir: Path) -> dict:
    from onnx import numpy_helper

    weight = numpy_helper.to_array(initializers[layer.weight], str(weights_dir)).astype(np.int32)
    codes = tensors[layer.codes].astype(np.int32)
    return {"input_shape": list(tensors[layer.source].shape), "weight_shape": list(weight.shape),
            "input_codes": [int(codes.min()), int(codes.max())], "weight_absmax": int(np.abs(weight).max()),
            "weights_beyond_7bit": float((np.abs(weight) > 64).mean())}  # fmt: skip


OptimizedSession = Callable[..., object]
"""(model bytes, path to save the optimized graph at, weights_dir=folder of its external data) -> an inference
session optimized like the engine."""


def tensor_bytes(model, feeds: dict[str, np.ndarray]) -> Callable[[str], int | None]:
    """The bytes of a tensor of `model` run on `feeds`, from ONNX shape inference with the inputs' shapes fixed to
    the feeds' (None where it cannot tell)."""
    import onnx
    from onnx import helper

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)  # read without its weights: small
    for value in fixed.graph.input:
        if value.name in feeds:
            for dim, length in zip(value.type.tensor_type.shape.dim, feeds[value.name].shape, strict=True):
                dim.dim_value = length
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True).graph  # data_prop: through Shape -> Reshape
    infos = {v.name: v.type.tensor_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}

    def size(name: str) -> int | None:
        info = infos.get(name)
        if info is None or not info.HasField("shape") or not all(d.HasField("dim_value") for d in info.shape.dim):
            return None
        return int(np.prod([d.dim_value for d in info.shape.dim])) * helper.tensor_dtype_to_np_dtype(info.elem_type).itemsize

    return size


def layer_chunks(model, feeds: dict[str, np.ndarray], layers: list[QuantizedLayer], budget: int) -> list[list[QuantizedLayer]]:
    """`layers` in graph order, cut into runs whose reference tensors (each source and codes once) fit `budget`;
    a tensor of unknown size counts as the largest known one."""
    size = tensor_bytes(model, feeds)
    known = {name: size(name) for layer in layers for name in (layer.source, layer.codes)}
    largest = max((b for b in known.values() if b is not None), default=0)
    chunks: list[list[QuantizedLayer]] = [[]]
    held: set[str] = set()
    for layer in layers:
        names = held | {layer.source, layer.codes}
        if chunks[-1] and sum(largest if known[n] is None else known[n] for n in names) > budget:
            chunks.append([])
            names = {layer.source, layer.codes}
        chunks[-1].append(layer)
        held = names
    return chunks


def reference_run(model, feeds: dict[str, np.ndarray], layers: list[QuantizedLayer], weights_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One op-by-op run of the whole graph: its output, and every layer's source tensor and input codes."""
    reference = reference_session(with_outputs(model, [name for layer in layers for name in (layer.source, layer.codes)]), weights_dir)
    values = reference.run(None, feeds)
    return values[0], dict(zip([o.name for o in reference.get_outputs()], values))


def checked_layers(model, feeds: dict[str, np.ndarray], layers: list[QuantizedLayer], optimized_session: OptimizedSession | None,
                   work: Path, weights_dir: Path) -> tuple[np.ndarray, list[LayerFidelity]]:  # fmt: skip
    """The reference's output for `feeds` and (with an `optimized_session`) every layer's fidelity, worst first:
    one reference run per chunk of layers (layer_chunks)."""
    output, results = None, []
    for chunk in layer_chunks(model, feeds, layers, CHUNK_BYTES) if optimized_session is not None else [[]]:
        value, tensors = reference_run(model, feeds, chunk, weights_dir)
        output = value if output is None else output
        if chunk:
            results += layer_errors(model, chunk, tensors, optimized_session, work, weights_dir)
        del tensors  # before the next chunk's run
    return output, sorted(results, key=lambda r: -r.rel_error)


def check_layers(model, feeds: dict[str, np.ndarray], optimized_session: OptimizedSession, work: Path, weights_dir: Path) -> list[LayerFidelity]:
    """Each quantized layer of `model` alone, optimized like the engine vs run op by op, on the inputs the
    reference run of the whole graph gives it for `feeds`; worst first."""
    layers = quantized_layers(model)
    return checked_layers(model, feeds, layers, optimized_session, work, weights_dir)[1] if layers else []


def layer_errors(model, layers: list[QuantizedLayer], tensors: dict[str, np.ndarray], optimized_session: OptimizedSession,
                 work: Path, weights_dir: Path) -> list[LayerFidelity]:  # fmt: skip
    """`check_layers` of `layers` given the reference run's tensors."""
    import onnx
    from onnx import helper

    types = {name: helper.np_dtype_to_tensor_dtype(tensors[name].dtype) for name in tensors}
    isolated = isolated_layers(model, layers, types)
    layer_feeds = {f"L{i}/{layer.source}": tensors[layer.source] for i, layer in enumerate(layers)}
    payload = isolated.SerializeToString()
    expected = reference_session(payload, weights_dir).run(None, layer_feeds)
    optimized_path = work / "isolated_layers.optimized.onnx"
    actual = optimized_session(payload, optimized_path, weights_dir=weights_dir).run(None, layer_feeds)
    optimized = onnx.load(str(optimized_path), load_external_data=False)
    initializers = {i.name: i for i in model.graph.initializer}
    return [LayerFidelity(layer.name, fused_kernel(optimized, f"L{i}/{layer.output}"), relative_error(a, e),
                          **layer_statistics(layer, initializers, tensors, weights_dir))
            for i, (layer, a, e) in enumerate(zip(layers, actual, expected))]  # fmt: skip


def reference_session(model, weights_dir: Path | None = None):
    """ONNX Runtime with graph optimizations off: every node as the ONNX spec defines it (the reference); a
    serialized graph's external data is read from `weights_dir`."""
    import onnxruntime as ort

    from .onnxruntime_backend import EXTERNAL_DATA_FOLDER

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # run once: an arena keeps its peak (lint at SD-1.5 size: 9.6 -> 6.7 GiB)
    if weights_dir is not None:
        options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(weights_dir))
    payload = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])


def reference_feeds(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feeds` cast to the graph's input types (FP16 graphs take FP16 x)."""
    from onnx import helper

    types = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    return {name: value.astype(types[name], copy=False) for name, value in feeds.items() if name in types}


@dataclass(frozen=True)
class BucketFidelity:
    bucket: str
    samples: int
    end_to_end: float  # relative L2 error of the engine's output against the reference
    worst_layers: list[LayerFidelity]  # the few worst, worst first

    def to_dict(self) -> dict:
        return {"bucket": self.bucket, "samples": self.samples, "end_to_end_rel_error": self.end_to_end,
                "worst_layers": [asdict(layer) for layer in self.worst_layers]}  # fmt: skip


def check_bucket(graph_path: Path, key: str, feeds: dict[str, np.ndarray], engine_run: Callable[[dict], np.ndarray],
                 optimized_session: OptimizedSession | None, work: Path, keep: int = 3) -> BucketFidelity:  # fmt: skip
    """End-to-end and (with an `optimized_session`) per-layer fidelity of one bucket's engine."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)  # ONNX Runtime reads the weights from their file
    feeds = reference_feeds(model, feeds)
    layers = quantized_layers(model)
    expected, results = checked_layers(model, feeds, layers, optimized_session, work, graph_path.parent)  # the first run serves both
    end_to_end = relative_error(engine_run(feeds), expected)
    return BucketFidelity(key, len(next(iter(feeds.values()))), end_to_end, results[:keep])


def bucket_feeds(export_dir: Path, manifest: dict) -> dict[str, dict[str, np.ndarray]]:
    """Up to SAMPLES_PER_BUCKET inputs per bucket graph: recorded calibration inputs whose timestep falls in the
    bucket, or (an export without them, or a bucket they miss) seeded stand-ins: x ~ N(0, 1) at the bucket's
    middle timestep, classes 0, 1, ..."""
    import torch
    from safetensors.numpy import load_file

    from dilatequant.core.denoiser import ModelSpec
    from dilatequant.export.contract import BucketTable

    table = BucketTable.from_dict(manifest["buckets"])
    spec = ModelSpec(manifest["model"]["family"], manifest["model"]["config"])
    recorded = load_file(str(export_dir / manifest["check_inputs"])) if manifest.get("check_inputs") else None
    buckets = table.buckets_of(recorded["t"]) if recorded else None
    rng, feeds = np.random.default_rng(0), {}
    for k, (low, high) in enumerate(table.ranges()):
        rows = np.flatnonzero(buckets == k)[:SAMPLES_PER_BUCKET] if recorded else []
        if len(rows):
            x, t, labels = recorded["x"][rows], recorded["t"][rows], recorded["labels"][rows]
        else:
            x = rng.standard_normal((SAMPLES_PER_BUCKET, *spec.sample_shape))
            t, labels = np.full(SAMPLES_PER_BUCKET, (low + high) // 2), np.arange(SAMPLES_PER_BUCKET) % (spec.num_classes or 1)
        labels = torch.from_numpy(labels.astype(np.int64))
        cond = torch.from_numpy(recorded["prompt_rows"])[labels] if recorded and "prompt_rows" in recorded else spec.conditioning(labels)
        feeds[f"bucket_{k}"] = {"x": x.astype(np.float32), "t": t.astype(np.int64),
                                **({"cond": cond.numpy()} if cond is not None else {})}  # fmt: skip
    return feeds


REFERENCE = "the export's graph run op by op by ONNX Runtime (CPU, graph optimizations off)"
# An engine this far from its own graph on calibration inputs is grossly broken whatever its layers say.
# Loose on purpose: code flips compound end to end (correct builds: digits W8A8 up to 2.3 %, a random-weight
# UNet 8-9 %), so finer drift is the per-layer check's job (docs/results/engine_fidelity.md).
END_TO_END_BOUND = 0.25


def check_engines(export_dir: Path, export_manifest: dict, engine_dir: Path, manifest: dict, backend, config) -> dict:
    """Fidelity of every bucket engine of `engine_dir` (the manifest fields `backend.load` reads), as the
    `fidelity` record of the engine manifest; `passed` says whether every layer is within `config.fidelity_bound`."""
    feeds = bucket_feeds(export_dir, export_manifest)
    optimized = getattr(backend, "optimized_session", None)
    optimized = functools.partial(optimized, config=config) if optimized else None
    buckets = []
    with tempfile.TemporaryDirectory() as work:
        for key, graph in export_manifest["graphs"].items():
            with backend.load(engine_dir, manifest, key) as engine:
                buckets.append(check_bucket(export_dir / graph, key, feeds[key], engine.infer, optimized, Path(work)))
    worst = max((layer for b in buckets for layer in b.worst_layers), key=lambda layer: layer.rel_error, default=None)
    failures = [f"layer {worst.describe()} is above the layer bound {config.fidelity_bound:.0e}"] if worst and worst.rel_error > config.fidelity_bound else []
    failures += [f"{b.bucket} is {b.end_to_end:.1%} from its graph end to end, above {END_TO_END_BOUND:.0%}" for b in buckets if b.end_to_end > END_TO_END_BOUND]
    return {"reference": REFERENCE, "layers_checked": optimized is not None, "layer_bound": config.fidelity_bound,
            "end_to_end_bound": END_TO_END_BOUND, "passed": not failures, "failures": failures,
            "worst_layer": worst.describe() if worst else None, "buckets": [b.to_dict() for b in buckets]}  # fmt: skip


def summary(report: dict) -> str:
    """One line for the build's output."""
    errors = ", ".join(f"{b['end_to_end_rel_error']:.2%}" for b in report["buckets"])
    if not report["passed"]:
        return f"fidelity FAILED: {'; '.join(report['failures'])}"
    layers = f"worst layer {report['worst_layer'] or '-'}" if report["layers_checked"] else "no per-layer check on this backend"
    return f"fidelity passed: {layers}; end to end {errors} against the graphs run op by op"


def check_graph(graph: Path, config) -> list[LayerFidelity] | None:
    """Every quantized layer of one bucket graph, optimized by ONNX Runtime's CPU backend as `build` would, on
    its export's check inputs (worst first); None for a graph outside an export directory (nothing to run it on)."""
    import json

    import onnx

    from .backend import get_backend

    manifest_path = graph.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    key = next((k for k, name in manifest.get("graphs", {}).items() if name == graph.name), None)
    if manifest.get("kind") != "export" or key is None:
        return None
    optimized = functools.partial(get_backend("onnxruntime").optimized_session, config=config)
    with tempfile.TemporaryDirectory() as work:
        model = onnx.load(str(graph), load_external_data=False)  # ONNX Runtime reads the weights from their file
        return check_layers(model, bucket_feeds(graph.parent, manifest)[key], optimized, Path(work), graph.parent)
