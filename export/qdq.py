"""Graph passes that make an FP graph quantized: int8 weights behind DequantizeLinear, and QuantizeLinear /
DequantizeLinear pairs (with the dilation pre-scale Mul) on the inputs of the quantized layers.

Each pass takes an onnx-graphsurgeon graph and the quantized layers' nodes, edits in place and returns the
number of nodes it changed. Activation scale and zero-point constants are named `act_scale::<group>` and
`act_zero_point::<group>`: the only initializers that differ between bucket graphs.

Symmetric int8 activations can be written as uint8 with zero point 128 — the same grid, value for value:
ONNX Runtime's CPU kernels fuse uint8 activations everywhere, while int8 ones only where a QuantizeLinear
has a single consumer (its common-subexpression pass merges the per-consumer copies of Q/K/V).
"""

from __future__ import annotations

import numpy as np

ACT_SCALE = "act_scale::"
ACT_ZERO_POINT = "act_zero_point::"


def weight_axis(node) -> int:
    """Output-channel axis of a node's weight: Conv 0, ConvTranspose 1, Gemm 0 (transB=1) or 1, MatMul 1 (W is in x out)."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1


def quantize_weights(graph, nodes: dict, steps: dict[str, np.ndarray], bits: dict[str, int]) -> int:
    """Replace each layer's FP weight by int8 values (4/6-bit values in int8 containers) and a per-channel DQ."""
    import onnx_graphsurgeon as gs

    for layer, node in nodes.items():
        weight = node.inputs[1]
        axis, step = weight_axis(node), steps[layer].astype(np.float32)
        shape = [1] * weight.values.ndim
        shape[axis] = -1
        qmax = 2 ** (bits[layer] - 1) - 1
        q = np.clip(np.round(weight.values / step.reshape(shape)), -qmax - 1, qmax).astype(np.int8)
        dequantized = gs.Variable(f"{layer}::weight_dq", dtype=np.float32, shape=weight.shape)
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{layer}::weight_DequantizeLinear", attrs={"axis": axis},
                                   inputs=[gs.Constant(f"{layer}::weight_int8", q), gs.Constant(f"{layer}::weight_scale", step),
                                           gs.Constant(f"{layer}::weight_zero_point", np.zeros_like(step, dtype=np.int8))],
                                   outputs=[dequantized]))  # fmt: skip
        node.inputs[1] = dequantized
    return len(nodes)


def zero_point_constant(name: str, zero_point: int, symmetric: bool, unsigned: bool):
    """The zero-point initializer: int8 for symmetric grids, uint8 for asymmetric ones or when `unsigned`."""
    import onnx_graphsurgeon as gs

    if symmetric and not unsigned:
        return gs.Constant(name, np.array(zero_point, dtype=np.int8))
    return gs.Constant(name, np.array(zero_point + (128 if symmetric else 0), dtype=np.uint8))


def scale_and_zero(name: str, scale: float, zero_point: int, symmetric: bool, unsigned: bool):
    """The per-bucket scale and zero-point initializers of one activation quantizer."""
    import onnx_graphsurgeon as gs

    scale_const = gs.Constant(f"{ACT_SCALE}{name}", np.array(scale, dtype=np.float32))
    return scale_const, zero_point_constant(f"{ACT_ZERO_POINT}{name}", zero_point, symmetric, unsigned)


def qdq_pair(graph, name: str, source, scale_const, zero_const):
    """Append `source -> QuantizeLinear -> DequantizeLinear` named after `name`; returns the dequantized tensor."""
    import onnx_graphsurgeon as gs

    quantized = gs.Variable(f"{name}::quantized", dtype=zero_const.values.dtype)
    dequantized = gs.Variable(f"{name}::dequantized", dtype=np.float32)
    graph.nodes.append(gs.Node("QuantizeLinear", name=f"{name}::QuantizeLinear", inputs=[source, scale_const, zero_const],
                               outputs=[quantized]))  # fmt: skip
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{name}::DequantizeLinear", inputs=[quantized, scale_const, zero_const],
                               outputs=[dequantized]))  # fmt: skip
    return dequantized


def insert_activation_qdq(graph, group: str, consumers: list, scale: float, zero_point: int, symmetric: bool,
                          prescale: np.ndarray | None, per_consumer: bool, unsigned: bool = False) -> int:  # fmt: skip
    """Quantize the shared input of `consumers`: [Mul(1/s)] -> QuantizeLinear -> DequantizeLinear.

    One Q/DQ pair shared by all consumers (TensorRT: one Q/DQ for Q/K/V) or one pair per consumer (ONNX
    Runtime fuses a QuantizeLinear into integer kernels only when it has a single consumer). Per-consumer
    pairs are named '<group>::<i>::QuantizeLinear'... with i the consumer's position.
    """
    import onnx_graphsurgeon as gs

    source = consumers[0].inputs[0]
    if prescale is not None:
        scaled = gs.Variable(f"{group}::prescaled", dtype=np.float32)
        graph.nodes.append(gs.Node("Mul", name=f"{group}::prescale_Mul", inputs=[source, gs.Constant(f"{group}::prescale", prescale)],
                                   outputs=[scaled]))  # fmt: skip
        source = scaled
    scale_const, zero_const = scale_and_zero(group, scale, zero_point, symmetric, unsigned)
    chains = [[c] for c in consumers] if per_consumer else [consumers]
    for i, chain in enumerate(chains):
        dequantized = qdq_pair(graph, f"{group}::{i}" if per_consumer else group, source, scale_const, zero_const)
        for consumer in chain:
            consumer.inputs[0] = dequantized
    return len(chains)


def insert_output_qdq(graph, name: str, node, scale: float, zero_point: int, symmetric: bool, unsigned: bool = False) -> int:
    """Quantize a node's output: node -> QuantizeLinear -> DequantizeLinear -> its former consumers."""
    output = node.outputs[0]
    consumers = list(output.outputs)
    dequantized = qdq_pair(graph, name, output, *scale_and_zero(name, scale, zero_point, symmetric, unsigned))
    for consumer in consumers:
        for i, tensor in enumerate(consumer.inputs):
            if tensor is output:
                consumer.inputs[i] = dequantized
    graph.outputs = [dequantized if tensor is output else tensor for tensor in graph.outputs]
    return 1
