"""Graph pass: make a graph small on disk so K bucket graphs cost little beside their shared weights.

Equal constants (Reshape targets, norm scales of ones, ...) become one initializer, except the per-bucket
activation scales and zero points; tensor names become base-62 ids except graph inputs/outputs and those
per-bucket initializers; only the names export gave keep: quantized layers (named after the layer) and their
QuantizeLinear nodes ('<group>::Q'); the exporter's '/denoiser/model/...' names go. Constant nodes are folded
into initializers.
"""

from __future__ import annotations

import hashlib
import itertools
import string

import numpy as np

from .qdq import ACT_SCALE, ACT_ZERO_POINT, peek

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
    """Point every node input at one initializer per distinct (dtype, shape, value); returns inputs re-pointed.
    Values are compared only among constants of one dtype and shape, and read without keeping them (`peek`):
    an unread external weight stays on disk."""
    import onnx_graphsurgeon as gs

    uses = [(node, i, tensor) for node in graph.nodes for i, tensor in enumerate(node.inputs)
            if isinstance(tensor, gs.Constant) and not per_bucket(tensor.name)]  # fmt: skip
    alike: dict[tuple, list] = {}
    for use in uses:
        alike.setdefault((np.dtype(use[2].dtype).str, tuple(use[2].shape)), []).append(use)
    shared = 0
    for group in alike.values():
        if len({id(tensor) for _, _, tensor in group}) < 2:
            continue
        first: dict[bytes, object] = {}
        digests: dict[int, bytes] = {}
        for node, i, tensor in group:
            digest = digests.setdefault(id(tensor), hashlib.sha256(peek(tensor).tobytes()).digest())
            canonical = first.setdefault(digest, tensor)
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
