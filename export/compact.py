"""Graph pass: make a graph small on disk so K bucket graphs cost little beside their shared weights.

Equal constants (Reshape targets, norm scales of ones, ...) become one initializer, except the per-bucket
activation scales and zero points; tensor names become base-62 ids except graph inputs/outputs and those
per-bucket initializers; only the names export gave keep: quantized layers (named after the layer) and their
QuantizeLinear nodes ('<group>::Q'); the exporter's '/denoiser/model/...' names go. Constant nodes are folded
into initializers.
"""

from __future__ import annotations

import itertools
import string

from .qdq import ACT_SCALE, ACT_ZERO_POINT

ID_ALPHABET = string.digits + string.ascii_letters


def short_id(number: int) -> str:
    """0 -> '0', 61 -> 'Z', 62 -> '10': base 62, so most names in a graph take two characters."""
    digits = ""
    while True:
        number, digit = divmod(number, len(ID_ALPHABET))
        digits = ID_ALPHABET[digit] + digits
        if not number:
            return digits


def per_bucket(name: str) -> bool:
    return name.startswith((ACT_SCALE, ACT_ZERO_POINT))


def share_equal_constants(graph) -> int:
    """Point every node input at one initializer per distinct (dtype, shape, value); returns inputs re-pointed."""
    import onnx_graphsurgeon as gs

    first: dict[tuple, object] = {}
    shared = 0
    for node in graph.nodes:
        for i, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant) or per_bucket(tensor.name):
                continue
            values = tensor.values
            canonical = first.setdefault((values.dtype.str, values.shape, values.tobytes()), tensor)
            if canonical is not tensor:
                node.inputs[i] = canonical
                shared += 1
    return shared


def compact(graph) -> int:
    """Edit an onnx-graphsurgeon graph in place; returns the number of tensors renamed."""
    graph.fold_constants(fold_shapes=False)
    share_equal_constants(graph)
    graph.cleanup()
    keep = {t.name for t in [*graph.inputs, *graph.outputs]}
    ids = (name for name in map(short_id, itertools.count()) if name not in keep)
    renamed = 0
    for tensor in graph.tensors().values():
        if tensor.name not in keep and not per_bucket(tensor.name):
            tensor.name = next(ids)
            renamed += 1
    for node in graph.nodes:
        if node.name.startswith("/"):  # the TorchScript exporter's scope names
            node.name = ""
    return renamed
