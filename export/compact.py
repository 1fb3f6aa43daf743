"""Graph pass: make a graph small on disk so K bucket graphs cost little beside their shared weights.

Tensor names become short ids except graph inputs/outputs and the per-bucket activation scale and zero-point
initializers; only quantized layers and inserted nodes ('<group>::QuantizeLinear', ...) keep node names
(without the exporter's '/denoiser/model/' prefix); Constant nodes are folded into initializers.
"""

from __future__ import annotations

from .graph import COMPUTE_OPS, SCOPE_PREFIX
from .qdq import ACT_SCALE, ACT_ZERO_POINT


def compact(graph) -> int:
    """Edit an onnx-graphsurgeon graph in place; returns the number of tensors renamed."""
    graph.fold_constants(fold_shapes=False)
    graph.cleanup()
    keep = {t.name for t in [*graph.inputs, *graph.outputs]}
    renamed = 0
    for tensor in graph.tensors().values():
        if tensor.name not in keep and not tensor.name.startswith((ACT_SCALE, ACT_ZERO_POINT)):
            tensor.name = f"v{renamed}"
            renamed += 1
    for node in graph.nodes:
        keep_name = "::" in node.name or (node.op in COMPUTE_OPS and node.name.startswith(SCOPE_PREFIX))
        node.name = node.name.removeprefix(SCOPE_PREFIX) if keep_name else ""
    return renamed
