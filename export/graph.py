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
from dilatequant.core.external_data import external_location, point_to

from .contract import BATCH_DIM, INPUT_NAMES, OUTPUT_NAME, TOKENS_DIM

SCOPE_PREFIX = "/denoiser/model/"
FP_WEIGHTS = "fp.weights"  # the traced graph's parameters, beside it in the export's work directory
INLINE_BYTES = 1024  # smaller tensors stay inside the graph
UNFOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
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
    """Export with a dynamic batch dimension; returns the graph's input names.

    The weights stream: the exporter traces without them (with them it held its own serialized copies, 2.8x the
    weight bytes on a 0.8 GB UNet, measured), each parameter is then written from the model to FP_WEIGHTS beside the
    graph, and the constant folding the exporter would have done on them is done node by node on disk
    (`fold_parameters`), so no second copy of the model is ever in memory."""
    x = torch.randn(2, *denoiser.sample_shape)
    t = torch.tensor([10, 900])
    cond = denoiser.conditioning(torch.tensor([0, 1]))
    args = (x, t) if cond is None else (x, t, cond)
    names = list(INPUT_NAMES[: len(args)])
    axes = {name: {0: BATCH_DIM} for name in [*names, OUTPUT_NAME]}
    if cond is not None and cond.dim() == 3:  # encoder states: text encoders pad to their own length (CLIP 77, T5 120)
        axes["cond"][1] = TOKENS_DIM
    # no_grad: tracing with autograd on kept every activation of the traced batch alive (SD-1.5 size: 4.6 GB, measured)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        wrapper = ExportWrapper(denoiser).eval()
        torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=[OUTPUT_NAME], opset_version=opset,
                          dynamo=False, dynamic_axes=axes, do_constant_folding=False, export_params=False)  # fmt: skip
    stream_parameters(path, wrapper.state_dict())
    return names


def stream_parameters(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Turn the parameter inputs of the graph at `path` (exported without parameters, named by state-dict key) into
    initializers whose data is written to FP_WEIGHTS one tensor at a time, then fold what only depends on them."""
    import onnx

    model = onnx.load(str(path))
    writer = ExternalWriter(path.parent / FP_WEIGHTS)
    for graph_input in [i for i in model.graph.input if i.name in state]:
        model.graph.initializer.append(writer.write(graph_input.name, state[graph_input.name].detach().cpu().numpy()))
        model.graph.input.remove(graph_input)
    fold_parameters(model, writer, path.parent)
    while fold_static_shapes(model):  # a branch chosen by a static dimension hides constants until it is inlined
        fold_parameters(model, writer, path.parent)
    drop_unused_initializers(model)
    onnx.save_model(model, str(path))


class ExternalWriter:
    """Appends tensors to one external-data file and returns their (external) TensorProtos; small ones stay inline."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        path.write_bytes(b"")

    def write(self, name: str, array: np.ndarray):
        from onnx import numpy_helper

        proto = numpy_helper.from_array(np.require(array, requirements="C"), name)  # ascontiguousarray makes 0-d arrays 1-d
        if array.nbytes <= INLINE_BYTES:
            return proto
        with self.path.open("ab") as file:
            file.write(proto.raw_data)
        point_to(proto, self.path.name, self.offset, array.nbytes)
        self.offset += array.nbytes
        return proto


def fold_parameters(model, writer: ExternalWriter, base_dir: Path) -> int:
    """Evaluate, in graph order, every node whose inputs are all constant (parameters, their transposes and
    reshapes, Constant nodes) with ONNX's reference evaluator, one node at a time: its inputs read from disk, its
    outputs written as initializers. What the exporter's own folding did, without holding the weights."""
    from onnx import AttributeProto, numpy_helper
    from onnx.reference import ReferenceEvaluator

    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    folded = []
    for node in model.graph.node:
        subgraph = any(attribute.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for attribute in node.attribute)
        if node.op_type in UNFOLDED or subgraph or not all(name in constants for name in node.input if name):
            continue
        inputs = [numpy_helper.to_array(constants[name], str(base_dir)) if name else None for name in node.input]
        outputs = ReferenceEvaluator(single_node_model(node, model)).run(None, dict(zip(node.input, inputs)))
        for name, value in zip(node.output, outputs):
            model.graph.initializer.append(writer.write(name, np.asarray(value)))
            # the graph's copy: the written proto's arena keeps the bytes it wrote out (cleared, not freed) while
            # it lives, which for all folded weights was 0.5 GiB at SD-1.5 size (measured)
            constants[name] = model.graph.initializer[-1]
        folded.append(node)
    for node in folded:
        model.graph.node.remove(node)
    return len(folded)


def drop_unused_initializers(model) -> None:
    """Remove initializers nothing reads any more (parameters that were only folded), subgraphs included."""
    used = used_names(model.graph) | {output.name for output in model.graph.output}
    kept = [tensor for tensor in model.graph.initializer if tensor.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def used_names(graph) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                names |= used_names(subgraph) | {output.name for output in subgraph.output}
    return names


def fold_static_shapes(model) -> int:
    """What the exporter's folding also did, now that the parameters are constants: Gather(Shape(T), i) of a
    dimension that shape inference knows becomes a constant, and an If whose condition is constant is replaced by
    the branch it takes. Returns how many nodes changed."""
    from onnx import helper, numpy_helper, shape_inference

    inferred = shape_inference.infer_shapes(model, strict_mode=False).graph
    dims = {info.name: [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
            for info in [*inferred.value_info, *inferred.input, *inferred.output]}  # fmt: skip
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    changed, nodes = 0, []
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if source is not None and source.op_type == "Shape" and node.input[1] in constants and len(source.attribute) == 0:
            indices, shape = numpy_helper.to_array(constants[node.input[1]]), dims.get(source.input[0])
            sizes = [shape[i] for i in indices.flatten()] if shape else [None]
            if None not in sizes:
                value = np.array(sizes, dtype=np.int64).reshape(indices.shape)
                nodes.append(helper.make_node("Constant", [], list(node.output), value=numpy_helper.from_array(value)))
                changed += 1
                continue
        if node.op_type == "If" and node.input[0] in constants:
            branch = next(a.g for a in node.attribute if a.name == ("then_branch" if numpy_helper.to_array(constants[node.input[0]]) else "else_branch"))
            nodes.extend(branch.node)
            nodes.extend(helper.make_node("Identity", [inner.name], [outer]) for inner, outer in zip(branch.output, node.output))
            changed += 1
            continue
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return changed


def single_node_model(node, model):
    from onnx import helper

    graph = helper.make_graph([node], "fold", [helper.make_tensor_value_info(name, 0, None) for name in node.input if name],
                              [helper.make_tensor_value_info(name, 0, None) for name in node.output])  # fmt: skip
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


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
