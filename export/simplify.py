"""Graph pass: remove the shape arithmetic and identity ops the TorchScript exporter leaves in a dynamic-batch graph.

Each bucket graph repeats every node, so nodes cost disk K times (export/README: 8 buckets <= 1.1x one graph).
The exporter computes each `Reshape` target as Concat(Unsqueeze(Gather(Shape(X), 0)), ...) to carry the batch
size; when the result keeps the input's batch dimension first, ONNX's `0` (copy this dimension) says the same
thing as a constant. Divisions and multiplications by a scalar 1 (diffusers' `output_scale_factor`) go too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def fold_batch_reshapes(graph) -> int:
    """Reshape(D, <computed shape>) -> Reshape(D, [0, c1, c2, ...]) when inference proves the output is
    [batch of D, c1, c2, ...] with constant c_i; the shape computation then becomes dead."""
    import onnx_graphsurgeon as gs

    folded = 0
    for node in graph.nodes:
        if node.op != "Reshape" or isinstance(node.inputs[1], gs.Constant) or node.attrs.get("allowzero", 0):
            continue
        data, output = node.inputs[0], node.outputs[0]
        if not (data.shape and output.shape) or output.shape[0] != data.shape[0] or isinstance(data.shape[0], int):
            continue
        if all(isinstance(d, int) for d in output.shape[1:]):
            node.inputs[1] = gs.Constant(f"{output.name}::shape", np.array([0, *output.shape[1:]], dtype=np.int64))
            folded += 1
    return folded


def remove_identity_arithmetic(graph) -> int:
    """Drop Mul/Div by a scalar 1.0: x * 1 and x / 1 are x, for any shape of x."""
    import onnx_graphsurgeon as gs

    removed = 0
    for node in graph.nodes:
        constant = node.inputs[1] if node.op in ("Mul", "Div") and len(node.inputs) == 2 else None
        if not isinstance(constant, gs.Constant) or len(constant.shape) != 0 or constant.values != 1:  # shape: not read
            continue
        source, output = node.inputs[0], node.outputs[0]
        if output in graph.outputs:
            continue
        for consumer in list(output.outputs):
            for i, tensor in enumerate(consumer.inputs):
                if tensor is output:
                    consumer.inputs[i] = source
        node.outputs.clear()
        removed += 1
    return removed


def simplify(model, base_dir: Path | None = None):
    """An onnx-graphsurgeon graph of `model` with batch-carrying shape arithmetic folded and identities removed.
    ONNX Runtime's symbolic shape inference is used: it tracks the dynamic batch through Reshape/Concat chains
    where onnx's own inference gives up (measured on digits: 54 of 54 such Reshapes vs 7). External-data
    weights (`model` loaded without them, graph.load_graph) are read from `base_dir` only where a pass needs them."""
    import onnx_graphsurgeon as gs
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from .graph import attach_external

    graph = gs.import_onnx(SymbolicShapeInference.infer_shapes(model, auto_merge=True))
    if base_dir is not None:
        attach_external(graph, base_dir)
    remove_identity_arithmetic(graph)
    fold_batch_reshapes(graph)
    graph.cleanup().fold_constants(fold_shapes=True, error_ok=False).cleanup()
    for tensor in graph.tensors().values():  # inferred shapes were a means; they cost bytes in every bucket graph
        if not isinstance(tensor, gs.Constant) and tensor not in (*graph.inputs, *graph.outputs):
            tensor.shape = None
    return graph.toposort()
