"""The FP ONNX export of a (dilated) denoiser and the map from quantized layers to their ONNX nodes.

Exporter: TorchScript (`dynamo=False`), chosen by measurement on `digits` (2-core CPU, torch 2.13, ORT 1.31):
0.5 s to export vs 10 s for the dynamo exporter, 99 vs 109 ms ORT latency at batch 8, and node names that
carry the module path (`/denoiser/model/down_blocks.0/resnets.0/conv1/Conv`), which the Q/DQ passes use.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dilatequant.core.denoiser import Denoiser

from .contract import INPUT_NAMES, OUTPUT_NAME

SCOPE_PREFIX = "/denoiser/model/"
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# an attention's matmul inputs (core/attention.py's MATMUL_INPUTS): role -> (q·kᵀ 0 or probs·v 1, input slot)
ATTENTION_INPUTS = {"q": (0, 0), "k": (0, 1), "probs": (1, 0), "v": (1, 1)}


class ExportWrapper(nn.Module):
    """`eps = f(x, t, cond)` with plain tensor inputs, as the graphs expose it."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoiser(x, t, cond)


def export_fp_graph(denoiser: Denoiser, path: Path, opset: int) -> list[str]:
    """Export with a dynamic batch dimension; returns the graph's input names."""
    x = torch.randn(2, *denoiser.sample_shape)
    t = torch.tensor([10, 900])
    cond = denoiser.conditioning(torch.tensor([0, 1]))
    args = (x, t) if cond is None else (x, t, cond)
    names = list(INPUT_NAMES[: len(args)])
    axes = {name: {0: "batch"} for name in [*names, OUTPUT_NAME]}
    if cond is not None and cond.dim() == 3:  # encoder states: text encoders pad to their own length (CLIP 77, T5 120)
        axes["cond"][1] = "tokens"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(ExportWrapper(denoiser).eval(), args, str(path), input_names=names, output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False, dynamic_axes=axes, do_constant_folding=True)  # fmt: skip
    return names


def load_graph(path: Path):
    """The exported graph as an onnx ModelProto whose weights stay on disk: the exporter writes a model over 2 GB
    as external data; the Conv/Gemm/MatMul weights in it are neither read here nor copied until a pass needs a
    tensor's values (`attach_external`) or the export writes it to its weights file
    (flow.save_with_shared_weights). The other initializers (biases, norms: small) are read, because ONNX Runtime's
    symbolic shape inference evaluates what they feed."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    weights = {node.input[1] for node in model.graph.node if node.op_type in COMPUTE_OPS and len(node.input) > 1}
    for tensor in model.graph.initializer:  # biases, norms: shape inference evaluates the ops they feed
        if uses_external_data(tensor) and tensor.name not in weights:
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return model


def external_values_class():
    """ExternalValues, defined on first use: onnx-graphsurgeon is an optional import."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    class ExternalValues(LazyValues):
        """An external-data tensor read from its file each time a pass asks for its values, without putting the
        data into the tensor proto (onnx's loader does) or keeping a mapping of the file open."""

        def __init__(self, tensor, base_dir: Path) -> None:
            super().__init__(tensor)
            self.path, self.offset, _ = external_location(tensor, base_dir)

        def load(self) -> np.ndarray:
            count = int(np.prod(self.shape, dtype=np.int64))
            return np.fromfile(self.path, dtype=self.dtype, count=count, offset=self.offset).reshape(self.shape)

    return ExternalValues


def external_location(tensor, base_dir: Path) -> tuple[Path, int, int | None]:
    """(file, offset, length or None: to the end of the file) of an external-data tensor proto."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    return base_dir / info["location"], int(info.get("offset", 0)), int(info["length"]) if "length" in info else None


def attach_external(graph, base_dir: Path) -> int:
    """Give every external-data constant of an onnx-graphsurgeon graph values read from `base_dir` on demand;
    returns how many. Constants nobody reads stay references, and export_onnx writes them back as such."""
    import onnx_graphsurgeon as gs
    from onnx.external_data_helper import uses_external_data

    values_class, attached = external_values_class(), 0
    for tensor in graph.tensors().values():
        lazy = getattr(tensor, "_values", None)  # gs keeps an unread initializer's proto here (its LazyValues)
        if isinstance(tensor, gs.Constant) and hasattr(lazy, "tensor") and uses_external_data(lazy.tensor):
            tensor.values = values_class(lazy.tensor, base_dir)
            attached += 1
    return attached


def onnx_scope(layer: str) -> str:
    """'down_blocks.0.resnets.0.conv1' -> '/denoiser/model/down_blocks.0/resnets.0/conv1/' (list indices stay dotted)."""
    parts: list[str] = []
    for part in layer.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return SCOPE_PREFIX + "/".join(parts) + "/"


def compute_node_names(node_names: list[tuple[str, str]], layers: list[str]) -> dict[str, str]:
    """layer -> name of its one Conv/Gemm/MatMul node, from (name, op_type) pairs; unsupported layers raise."""
    from dilatequant.core.errors import UserError

    found = {}
    for layer in layers:
        scope = onnx_scope(layer)
        matches = [name for name, op in node_names if op in COMPUTE_OPS and name.startswith(scope) and "/" not in name[len(scope):]]
        if len(matches) != 1:
            raise UserError(f"Layer '{layer}' did not export as exactly one {'/'.join(COMPUTE_OPS)} node under {scope} "
                            f"(found {matches or 'none'}); this layer type is not supported by export.")  # fmt: skip
        found[layer] = matches[0]
    return found


def attention_inputs(graph, attentions: list[str]) -> dict[str, tuple[object, int]]:
    """'<attention>.attn_<role>' -> (its MatMul node, input slot), for attentions exported by core's explicit
    processor: under each Attention's own scope, two MatMuls of two activations, the second fed by the Softmax."""
    import onnx_graphsurgeon as gs

    from dilatequant.core.errors import UserError

    found = {}
    for attention in attentions:
        scope = onnx_scope(attention)
        matmuls = [n for n in graph.nodes if n.op == "MatMul" and n.name.startswith(scope) and "/" not in n.name[len(scope):]
                   and not any(isinstance(i, gs.Constant) for i in n.inputs)]  # fmt: skip
        if len(matmuls) != 2 or "Softmax" not in producer_ops(matmuls[1].inputs[0]):
            raise UserError(f"Attention '{attention}' did not export as q·kᵀ, softmax, ·v under {scope} (found MatMuls "
                            f"{[n.name for n in matmuls]}); its processor is not dilatequant's explicit one.")  # fmt: skip
        for role, (position, slot) in ATTENTION_INPUTS.items():
            found[f"{attention}.attn_{role}"] = (matmuls[position], slot)
    return found


def producer_ops(tensor, through: tuple[str, ...] = ("Cast",)) -> list[str]:
    """The op that produces `tensor`, looking through `through` (a Cast around the softmax): e.g. ['Cast', 'Softmax']."""
    ops = []
    while tensor.inputs:
        ops.append(tensor.inputs[0].op)
        if ops[-1] not in through:
            break
        tensor = tensor.inputs[0].inputs[0]
    return ops
