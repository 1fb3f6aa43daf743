"""Group-wise weights as ONNX Runtime's `com.microsoft.MatMulNBits`: block-quantized B, float A.

MatMulNBits stores B [N, K] as unsigned `bits`-bit integers in blocks of `block_size` along K, with one scale and
one (packed) zero point per (row, block): `B = (q − z) · scale`, exactly Q-DiT's group-wise weight grid with the
group size as block size. Signed symmetric grids are shifted into that unsigned form (q + 2^(b−1), zero point
2^(b−1)), value for value. `accuracy_level=4` makes ONNX Runtime quantize A too, per row and block to int8 with
a symmetric dynamic scale, and run integer kernels (measured here: ONNX Runtime 1.31 accepts block sizes 16, 32,
64, 128 and 256 only, so Q-DiT's 96/192/288 cannot be deployed there).
"""

from __future__ import annotations

import numpy as np

from dilatequant.core.errors import UserError

from .qdq import linear_weight

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops
ORT_BLOCK_SIZES = (16, 32, 64, 128, 256)
ORT_BITS = (4, 8)


def check_deployable(layer: str, bits: int, group_size: int) -> None:
    """Refuse, by name, what ONNX Runtime's MatMulNBits cannot run."""
    if bits not in ORT_BITS:
        raise UserError(f"{layer}: {bits}-bit group-wise weights cannot be deployed as MatMulNBits (ONNX Runtime runs "
                        f"{', '.join(map(str, ORT_BITS))} bits); calibrate with 4- or 8-bit weights.")  # fmt: skip
    if group_size not in ORT_BLOCK_SIZES:
        raise UserError(f"{layer}: group size {group_size} cannot be deployed as MatMulNBits (ONNX Runtime takes block "
                        f"sizes {', '.join(map(str, ORT_BLOCK_SIZES))}); search over those group sizes.")  # fmt: skip


def integer_weights(weight: np.ndarray, step: np.ndarray, zero: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """The unsigned integers [N, G, group] and zero points [N, G] of a group-wise grid (the fake quantizer's rounding)."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    groups = weight.reshape(step.shape[0], step.shape[1], -1)
    q = np.clip(np.rint(groups / step[..., None]) + zero[..., None], qmin, qmax)
    return (q - qmin).astype(np.uint8), (zero - qmin).astype(np.uint8)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers along the last axis, low bits first (two 4-bit values a byte), padding an odd count."""
    if bits == 8:
        return values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits_parts(name: str, weight: np.ndarray, step: np.ndarray, zero: np.ndarray, bits: int, symmetric: bool,
                       accuracy_level: int) -> tuple[dict, dict[str, np.ndarray]]:  # fmt: skip
    """MatMulNBits' attributes and its B initializers (packed weights, scales, packed zero points, in input order)
    for the group-wise grid (step, zero) [N, G] of `weight` [N, K]."""
    n, k = weight.shape
    group_size = k // step.shape[1]
    check_deployable(name, bits, group_size)
    q, z = integer_weights(weight, step, zero, bits, symmetric)
    attrs = {"K": k, "N": n, "bits": bits, "block_size": group_size, "accuracy_level": accuracy_level}
    tensors = {f"{name}.qweight": pack(q, bits), f"{name}.scales": step.astype(np.float32).reshape(-1),
               f"{name}.zero_points": pack(z, bits).reshape(-1)}  # fmt: skip
    return attrs, tensors


def matmul_nbits(name: str, input_name: str, output_name: str, weight: np.ndarray, step: np.ndarray, zero: np.ndarray,
                 bits: int, symmetric: bool, accuracy_level: int = 4, bias: np.ndarray | None = None):  # fmt: skip
    """The MatMulNBits node computing `input @ weightᵀ (+ bias)` with the group-wise grid (step, zero) [N, G] of
    `weight` [N, K], and its initializers (onnx TensorProtos named after `name`)."""
    from onnx import helper, numpy_helper

    attrs, tensors = matmul_nbits_parts(name, weight, step, zero, bits, symmetric, accuracy_level)
    inputs = [input_name, *tensors]
    if bias is not None:
        tensors[f"{name}.bias"] = bias.astype(np.float32)
        inputs += ["", f"{name}.bias"]  # no g_idx
    node = helper.make_node("MatMulNBits", inputs, [output_name], name=name, domain=MS_DOMAIN, **attrs)
    return node, [numpy_helper.from_array(value, key) for key, value in tensors.items()]


def replace_linear(graph, node, layer: str, step: np.ndarray, zero: np.ndarray, bits: int, symmetric: bool,
                   accuracy_level: int) -> None:  # fmt: skip
    """Graph pass (onnx-graphsurgeon): compute a Linear layer's MatMul or Gemm node as MatMulNBits with its
    group-wise grid, named after the layer; the old node is left disconnected for cleanup()."""
    import onnx_graphsurgeon as gs

    if node.op == "Gemm" and (node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0 or node.attrs.get("transA", 0)):
        raise UserError(f"{layer}: a Gemm with alpha/beta/transA cannot be written as MatMulNBits.")
    attrs, tensors = matmul_nbits_parts(layer, linear_weight(node), step, zero, bits, symmetric, accuracy_level)
    inputs = [node.inputs[0], *(gs.Constant(key, value) for key, value in tensors.items())]
    if node.op == "Gemm" and len(node.inputs) > 2:
        inputs += [gs.Variable.empty(), node.inputs[2]]  # no g_idx, then the bias
    graph.nodes.append(gs.Node("MatMulNBits", name=layer, domain=MS_DOMAIN, attrs=attrs, inputs=inputs, outputs=list(node.outputs)))
    node.inputs.clear()
    node.outputs.clear()


def add_domain(model) -> None:
    """Declare ONNX Runtime's contrib domain in a model that uses MatMulNBits."""
    from onnx import helper

    if any(node.domain == MS_DOMAIN for node in model.graph.node) and all(o.domain != MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
