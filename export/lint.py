"""`dilatequant lint`: check a Q/DQ graph against a deployment profile and name every violating node.

tensorrt (static, DESIGN.md §4): symmetric int8 (zero points 0), constant positive scales, per-tensor
activations, per-output-channel weights on the right axis, Q/DQ only on inputs of Conv/ConvTranspose/Gemm/
MatMul (optionally a residual Add), none on outputs, one QuantizeLinear per quantized tensor, no
DynamicQuantizeLinear or QLinear*/integer ops; quantized attention as TensorRT fuses it (both inputs of q·kᵀ and
of probs·v quantized, the probabilities right after the Softmax).
ort-cpu, ort-dynamic: ONNX Runtime optimizes the graph; the share of quantized Conv/MatMul/Gemm that became integer
kernels, MatMulNBits counted as one where it quantizes its input (accuracy_level 4; weight-only ones compute in float).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUANTIZABLE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
FORBIDDEN = {"DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "MatMulNBits"}
# why TensorRT refuses an op, where there is more to say than "not allowed"
REFUSAL_REASONS = {
    "DynamicQuantizeLinear": "TensorRT INT8 has no dynamic (run-time, per-token) activation quantization: its scales are "
                             "constants of the graph; calibrate static tables (--static-activations) for this profile",
    "MatMulNBits": "an ONNX Runtime contrib op (com.microsoft) that TensorRT's parser does not take; group-wise weights with "
                   "dynamic int8 inputs run on ONNX Runtime (--profile ort-dynamic)",
}
INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul"}


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


def node_label(node, index: int) -> str:
    return node.name or f"#{index} ({node.op_type})"


def weight_axis_for(consumer, input_index: int) -> int | None:
    """The output-channel axis TensorRT expects for a weight feeding `consumer` at `input_index`."""
    if input_index != 1:
        return None
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1 if consumer.op_type == "MatMul" else None


def lint_tensorrt(model, allow_residual_add: bool = False) -> list[Violation]:
    from onnx import TensorProto, numpy_helper

    graph, violations = model.graph, []
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    outputs = {o.name for o in graph.output}
    allowed = QUANTIZABLE | ({"Add"} if allow_residual_add else set())
    quantized_inputs: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        label = node_label(node, index)
        if node.op_type in FORBIDDEN:
            reason = REFUSAL_REASONS.get(node.op_type, "not allowed in a TensorRT explicit-quantization graph")
            violations.append(Violation("op", label, f"{node.op_type}: {reason}"))
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = initializers.get(node.input[1])
        if scale is None:
            violations.append(Violation("scale", label, "scale is not a constant initializer"))
        elif (numpy_helper.to_array(scale) <= 0).any():
            violations.append(Violation("scale", label, "scale is not > 0"))
        zero = initializers.get(node.input[2]) if len(node.input) > 2 else None
        if zero is not None and (zero.data_type != TensorProto.INT8 or numpy_helper.to_array(zero).any()):
            violations.append(Violation("symmetric", label, "zero point must be int8 and 0 (TensorRT takes symmetric int8 only)"))
        if node.op_type == "QuantizeLinear":
            # a Q right after a Conv is fine when its DQ feeds the next Conv: placement is judged by the DQ's consumers
            quantized_inputs[node.input[0]] = quantized_inputs.get(node.input[0], 0) + 1
            if scale is not None and len(scale.dims) > 0 and np.prod(scale.dims) > 1:
                violations.append(Violation("per-tensor", label, "activation scales must be per tensor"))
            continue
        if node.output[0] in outputs:
            violations.append(Violation("output", label, "a DequantizeLinear feeds a graph output"))
        weight_input = node.input[0] in initializers
        for consumer, position in consumers.get(node.output[0], []):
            if consumer.op_type not in allowed:
                violations.append(Violation("placement", label, f"feeds {consumer.op_type} {consumer.name or ''}; Q/DQ belong "
                                            f"only on inputs of {'/'.join(sorted(allowed))}"))  # fmt: skip
            elif weight_input:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                expected = weight_axis_for(consumer, position)
                if expected is not None and scale is not None and len(scale.dims) == 1 and axis != expected:
                    violations.append(Violation("weight-axis", label, f"per-channel axis {axis}, {consumer.op_type} needs {expected}"))
    for tensor, count in quantized_inputs.items():
        if count > 1:
            violations.append(Violation("shared-qdq", tensor, f"quantized by {count} QuantizeLinear nodes; share one (e.g. Q/K/V)"))
    return violations + lint_attention(graph, initializers)


def lint_attention(graph, initializers: dict) -> list[Violation]:
    """TensorRT fuses quantized attention only in one placement: Q/DQ on both inputs of q·kᵀ and of probs·v, the
    probabilities quantized right after the Softmax (a Cast between is fine). Checks every MatMul of two activations."""
    producers = {name: node for node in graph.node for name in node.output}
    violations = []
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul" or any(is_constant(name, producers, initializers) for name in node.input):
            continue
        label = node_label(node, index)
        dequantized = [producers.get(name) is not None and producers[name].op_type == "DequantizeLinear" for name in node.input]
        if any(dequantized) and not all(dequantized):
            missing = "A" if not dequantized[0] else "B"
            violations.append(Violation("attention-pair", label, f"only one input of this activation MatMul is quantized (input "
                                        f"{missing} is not); TensorRT's fused attention needs Q/DQ on both inputs of q·kᵀ and of probs·v"))  # fmt: skip
        if dequantized[0] and "Softmax" in upstream_ops(node.input[0], producers):
            quantize = producers[producers[node.input[0]].input[0]]
            source = producers.get(quantize.input[0])
            while source is not None and source.op_type == "Cast":
                source = producers.get(source.input[0])
            if source is None or source.op_type != "Softmax":
                violations.append(Violation("softmax-output", label, f"the probabilities are quantized after a "
                                            f"{source.op_type if source else 'graph input'}, not right after the Softmax; "
                                            "TensorRT's fused attention quantizes the Softmax output itself"))  # fmt: skip
    return violations


def is_constant(name: str, producers: dict, initializers: dict) -> bool:
    """An initializer, a Constant, or a weight behind its DequantizeLinear."""
    node = producers.get(name)
    if name in initializers or (node is not None and node.op_type == "Constant"):
        return True
    return node is not None and node.op_type == "DequantizeLinear" and is_constant(node.input[0], producers, initializers)


def upstream_ops(name: str, producers: dict, depth: int = 6) -> list[str]:
    """The ops on the first-input path above tensor `name`, nearest first (up to `depth`)."""
    ops = []
    while len(ops) < depth and (node := producers.get(name)) is not None:
        ops.append(node.op_type)
        name = node.input[0]
    return ops


def load_for_lint(path: Path):
    """The graph at `path` with only what lint reads: Q/DQ scales and zero points. A graph's weights may be external
    data beyond protobuf's 2 GB (an SD-size export): they stay on disk. Not an ONNX file: a one-line UserError."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    from dilatequant.core.errors import UserError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise UserError(f"{path} is not an ONNX model ({type(exc).__name__}); lint takes a .onnx graph, e.g. an export's "
                        "bucket_0.onnx.") from None  # fmt: skip
    read = {name for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear") for name in node.input[1:]}
    for tensor in model.graph.initializer:
        if tensor.name in read and uses_external_data(tensor):
            try:
                load_external_data_for_tensor(tensor, str(Path(path).parent))
            except OSError as exc:
                raise UserError(f"{path} keeps initializer {tensor.name} in external data that cannot be read ({exc}); keep the "
                                "graph beside its weights file (an export directory as written).") from None  # fmt: skip
            tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def ort_fusion(path: Path, threads: int = 1) -> dict:
    """Optimize with ONNX Runtime's CPU EP and report which quantized compute nodes became integer kernels."""
    import onnx
    import onnxruntime as ort

    source = onnx.load(str(path), load_external_data=False)
    dequantized = {n.output[0] for n in source.graph.node if n.op_type == "DequantizeLinear"}
    quantized = [n for n in source.graph.node if n.op_type in QUANTIZABLE and n.input and n.input[0] in dequantized]
    nbits = [n for n in source.graph.node if n.op_type == "MatMulNBits"]
    if not quantized and not nbits:  # nothing to fuse (an FP32 export): no session, which would hold ~2x the weights
        return fusion_report(quantized, [], [], nbits)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        # weights beside it: an optimized graph over protobuf's 2 GB (an SD-size FP32 UNet) cannot be one file
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # its warning that an optimized graph is CPU-specific is what lint asks for
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False)
    integer = [n for n in optimized.graph.node if n.op_type in INTEGER_KERNELS]
    quantized_names = {n.name for n in quantized}
    left = [n.name or n.op_type for n in optimized.graph.node if n.op_type in QUANTIZABLE and n.name in quantized_names]
    return fusion_report(quantized, integer, left, nbits)


def fusion_report(quantized: list, integer: list, left: list[str], nbits: list) -> dict:
    """What `ort_fusion` reports: quantized compute nodes (Q/DQ-fed ones and MatMulNBits) and which became integer kernels."""
    nbits_integer = [n for n in nbits if next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) == 4]
    return {"quantized_compute_nodes": len(quantized) + len(nbits), "integer_kernels": len(integer) + len(nbits_integer),
            "fused_share": (len(integer) + len(nbits_integer)) / max(1, len(quantized) + len(nbits)),
            "left_in_float": left + [n.name for n in nbits if n not in nbits_integer],
            "integer_kernel_types": sorted({n.op_type for n in integer + nbits_integer}),
            "matmul_nbits": {"nodes": len(nbits), "integer_inputs": len(nbits_integer)}}  # fmt: skip
