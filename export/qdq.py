"""Graph passes that make an FP graph quantized: int8 weights behind DequantizeLinear, and QuantizeLinear /
DequantizeLinear pairs (with the dilation pre-scale Mul) on the inputs of the quantized layers.

Each pass takes an onnx-graphsurgeon graph and the quantized layers' nodes, edits in place and returns the
number of nodes it changed. Activation scales and asymmetric zero points are named `s:<i>` and `z:<i>`, i the
group's position in the model's `act_quantizers()`: the only initializers that differ between bucket graphs
(short, because every bucket graph repeats every name; the QuantizeLinear node carries the group's name).

Symmetric int8 activations can be written as uint8 with zero point 128 — the same grid, value for value:
ONNX Runtime's CPU kernels fuse uint8 activations everywhere, while int8 ones only where a QuantizeLinear
has a single consumer (its common-subexpression pass merges the per-consumer copies of Q/K/V).
"""

from __future__ import annotations

import numpy as np

ACT_SCALE = "s:"
ACT_ZERO_POINT = "z:"


def peek(constant) -> np.ndarray:
    """A constant's values, read without onnx-graphsurgeon caching them in the constant (as `.values` does)."""
    lazy = constant._values  # gs keeps unread values as a LazyValues (graph.attach_external's, or its own)
    return lazy.load() if hasattr(lazy, "load") else lazy


def weight_axis(node) -> int:
    """Output-channel axis of a node's weight: Conv 0, ConvTranspose 1, Gemm 0 (transB=1) or 1, MatMul 1 (W is in x out)."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1


def symmetric_integers(values: np.ndarray, step: np.ndarray, bits: int) -> np.ndarray:
    """round(values / step) clipped to the signed `bits`-bit range, in int8 containers (`step` broadcasts)."""
    qmax = 2 ** (bits - 1) - 1
    return np.clip(np.round(values / step), -qmax - 1, qmax).astype(np.int8)


def dequantize_weight(graph, node, layer: str, q: np.ndarray, scale: np.ndarray, attrs: dict) -> None:
    """Feed `node` its weight as integers `q` behind a DequantizeLinear with `scale` and a zero point of 0."""
    import onnx_graphsurgeon as gs

    dequantized = gs.Variable(f"{layer}::weight_dq", dtype=np.float32, shape=node.inputs[1].shape)
    graph.nodes.append(gs.Node("DequantizeLinear", attrs=attrs, outputs=[dequantized],
                               inputs=[gs.Constant(f"{layer}::weight_int8", q), gs.Constant(f"{layer}::weight_scale", scale),
                                       gs.Constant(f"{layer}::weight_zero_point", np.zeros_like(scale, dtype=np.int8))]))  # fmt: skip
    node.inputs[1] = dequantized


def quantize_weights(graph, nodes: dict, steps: dict[str, np.ndarray], bits: dict[str, int]) -> int:
    """Replace each layer's FP weight by int8 values (4/6-bit values in int8 containers) and a per-channel DQ.
    The zero points (0) are written although 0 is the default: ONNX Runtime 1.31 fuses Gemm into QGemm only
    with them (measured: 62 of 76 digits layers fused without, 75 with)."""
    for layer, node in nodes.items():
        weight = node.inputs[1]
        axis, step = weight_axis(node), steps[layer].astype(np.float32)
        values = peek(weight)  # not weight.values, which caches it in the constant: the step peaked 2 GiB higher at SD-1.5 size
        shape = [1] * values.ndim
        shape[axis] = -1
        attrs = {"axis": axis} if axis != 1 else {}  # 1 is the default: omitted, like every byte each bucket repeats
        dequantize_weight(graph, node, layer, symmetric_integers(values, step.reshape(shape), bits[layer]), step, attrs)
    return len(nodes)


def linear_weight(node) -> np.ndarray:
    """A MatMul/Gemm node's constant weight as [out, in] (MatMul and Gemm without transB store [in, out])."""
    values = peek(node.inputs[1])
    return values if weight_axis(node) == 0 else values.T


def zero_point_constant(name: str, zero_point: int, symmetric: bool, unsigned: bool):
    """The zero-point initializer: int8 for symmetric grids, uint8 for asymmetric ones or when `unsigned`."""
    import onnx_graphsurgeon as gs

    if symmetric and not unsigned:
        return gs.Constant(name, np.array(zero_point, dtype=np.int8))
    return gs.Constant(name, np.array(zero_point + (128 if symmetric else 0), dtype=np.uint8))


def scale_and_zero(index: int, scale: float, zero_point: int, symmetric: bool, unsigned: bool):
    """The scale and zero-point initializers of activation quantizer number `index`. The scale is per bucket;
    so is the zero point of an asymmetric grid, while a symmetric grid's (0, or 128 as uint8) is one constant."""
    import onnx_graphsurgeon as gs

    scale_const = gs.Constant(f"{ACT_SCALE}{index}", np.array(scale, dtype=np.float32))
    zero_name = f"symmetric_zero_point:{index}" if symmetric else f"{ACT_ZERO_POINT}{index}"
    return scale_const, zero_point_constant(zero_name, zero_point, symmetric, unsigned)


def qdq_pair(graph, name: str, source, scale_const, zero_const):
    """Append `source -> QuantizeLinear -> DequantizeLinear`, the Q node named '<name>::Q' (the DQ is found as
    its consumer); returns the dequantized tensor."""
    import onnx_graphsurgeon as gs

    quantized = gs.Variable(f"{name}::quantized", dtype=zero_const.values.dtype)
    dequantized = gs.Variable(f"{name}::dequantized", dtype=np.float32)
    graph.nodes.append(gs.Node("QuantizeLinear", name=f"{name}::Q", inputs=[source, scale_const, zero_const],
                               outputs=[quantized]))  # fmt: skip
    graph.nodes.append(gs.Node("DequantizeLinear", inputs=[quantized, scale_const, zero_const], outputs=[dequantized]))
    return dequantized


def insert_activation_qdq(graph, group: str, index: int, consumers: list, scale: float, zero_point: int, symmetric: bool,
                          prescale: np.ndarray | None, per_consumer: bool, unsigned: bool = False, slot: int = 0) -> int:  # fmt: skip
    """Quantize the shared input `slot` of `consumers` (0: a layer's activation; attention matmuls quantize both
    inputs): [Mul(1/s)] -> QuantizeLinear -> DequantizeLinear.

    One Q/DQ pair shared by all consumers (TensorRT: one Q/DQ for Q/K/V) or one pair per consumer (ONNX
    Runtime fuses a QuantizeLinear into integer kernels only when it has a single consumer). Per-consumer
    QuantizeLinear nodes are named '<group>::Q', or '<group>::<i>::Q' with i the consumer's position.
    """
    import onnx_graphsurgeon as gs

    source = consumers[0].inputs[slot]
    if prescale is not None:
        scaled = gs.Variable(f"{group}::prescaled", dtype=np.float32)
        graph.nodes.append(gs.Node("Mul", inputs=[source, gs.Constant(f"{group}::prescale", prescale)],
                                   outputs=[scaled]))  # fmt: skip
        source = scaled
    scale_const, zero_const = scale_and_zero(index, scale, zero_point, symmetric, unsigned)
    chains = [[c] for c in consumers] if per_consumer else [consumers]
    for i, chain in enumerate(chains):
        dequantized = qdq_pair(graph, f"{group}::{i}" if per_consumer else group, source, scale_const, zero_const)
        for consumer in chain:
            consumer.inputs[slot] = dequantized
    return len(chains)


def insert_output_qdq(graph, name: str, index: int, node, scale: float, zero_point: int, symmetric: bool,
                      unsigned: bool = False) -> int:  # fmt: skip
    """Quantize a node's output: node -> QuantizeLinear -> DequantizeLinear -> its former consumers."""
    output = node.outputs[0]
    consumers = list(output.outputs)
    dequantized = qdq_pair(graph, name, output, *scale_and_zero(index, scale, zero_point, symmetric, unsigned))
    for consumer in consumers:
        for i, tensor in enumerate(consumer.inputs):
            if tensor is output:
                consumer.inputs[i] = dequantized
    graph.outputs = [dequantized if tensor is output else tensor for tensor in graph.outputs]
    return 1


def blocked_weight_dq(graph, node, layer: str, step: np.ndarray, bits: int) -> None:
    """Replace a Linear layer's MatMul/Gemm weight by symmetric integers (int8 containers) behind a block-quantized
    DequantizeLinear (opset 21 `block_size`): one scale per (output channel, group of input channels), as
    calibrate's symmetric GroupWeightQuantizer [N, G] rounds them."""
    values = linear_weight(node)
    n, k = values.shape
    q = symmetric_integers(values.reshape(n, step.shape[1], -1), step[..., None], bits).reshape(n, k)
    scale = step.astype(np.float32)
    axis = 1 - weight_axis(node)  # the input-channel axis, along which the blocks run
    if axis == 0:  # stored [in, out]
        q, scale = q.T, scale.T
    attrs = {"axis": axis, "block_size": k // step.shape[1]}
    dequantize_weight(graph, node, layer, np.ascontiguousarray(q), np.ascontiguousarray(scale), attrs)


def has_blocked_dequantize(model) -> bool:
    return any(node.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in node.attribute) for node in model.graph.node)


def raise_opset(model, version: int) -> None:
    """Raise the default-domain opset to at least `version` (the ops these graphs use keep their meaning)."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, version)


BLOCKED_OPSET = 21  # the first opset whose DequantizeLinear takes `block_size`
INT4_OPSET = 21  # the first opset whose DequantizeLinear takes INT4
INT4_CONSUMERS = ("MatMul", "Gemm")  # TensorRT dequantizes INT4 weights only into GEMMs (weight-only INT4)


def pack_int4_weights(model, layers: set[str]) -> int:
    """Store the weights of `layers` (4-bit, feeding MatMul/Gemm) as packed INT4 instead of int8 containers,
    without the zero point (0 by default), and raise the model's opset to 21; returns the weights packed.

    Works on the final ModelProto: onnx-graphsurgeon cannot hold INT4 constants. Opsets 20 and 21 only widen
    type lists of the ops these graphs use, so raising the version keeps their meaning.
    """
    import ml_dtypes
    from onnx import numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    producers = {name: node for node in model.graph.node for name in node.output}
    packed = 0
    for node in model.graph.node:
        if node.name not in layers or node.op_type not in INT4_CONSUMERS:
            continue
        dequantize = producers[node.input[1]]
        weight = initializers[dequantize.input[0]]
        values = numpy_helper.to_array(weight)
        weight.CopyFrom(numpy_helper.from_array(values.astype(ml_dtypes.int4), weight.name))
        del dequantize.input[2:]
        packed += 1
    if packed:
        raise_opset(model, INT4_OPSET)
    return packed
