"""Graph pass: FP16 for everything the Q/DQ pairs leave in floating point (the tensorrt profile's default).

TensorRT 10/11 strongly typed networks run each tensor in the type the graph gives it, so the graph itself must
be FP16 (DESIGN.md §4). Two parts stay FP32:
- the timestep embedding, from the `t` input up to the first QuantizeLinear/Conv/Gemm/MatMul: its sin/cos take
  arguments up to ~1000 rad, which FP16 (11-bit mantissa) rounds by up to 0.5 rad; a Cast to FP16 follows it;
- inputs that ONNX types as float regardless of the data (Resize's roi and scales).
Graph inputs and outputs become FP16 too; a runtime casts what it feeds.
"""

from __future__ import annotations

import numpy as np

TIMESTEP_INPUT = "t"
REGION_STOPS = {"QuantizeLinear", "Conv", "ConvTranspose", "Gemm", "MatMul"}
FLOAT_ONLY_INPUTS = {"Resize": (1, 2)}


def timestep_region(graph) -> set[int]:
    """Nodes computing the timestep embedding: those reachable from `t` without passing a REGION_STOPS node,
    plus the nodes that feed only them (e.g. the ones(batch) that `t` is multiplied by). Returned as node ids
    (onnx-graphsurgeon nodes are not hashable)."""
    inputs = [tensor for tensor in graph.inputs if tensor.name == TIMESTEP_INPUT]
    region, frontier, members = set(), list(inputs), []
    while frontier:
        for node in frontier.pop().outputs:
            if node.op not in REGION_STOPS and id(node) not in region:
                region.add(id(node))
                members.append(node)
                frontier.extend(node.outputs)
    while members:
        for tensor in members.pop().inputs:
            producer = tensor.inputs[0] if tensor.inputs else None
            if producer is not None and id(producer) not in region and all(id(c) in region for t in producer.outputs for c in t.outputs):
                region.add(id(producer))
                members.append(producer)
    return region


def keeps_float32(node, index: int) -> bool:
    return index in FLOAT_ONLY_INPUTS.get(node.op, ())


def cast_region_outputs(graph, region: set[int]) -> int:
    """Insert Cast(to FP16) where a float tensor computed inside `region` reaches a node outside it."""
    import onnx
    import onnx_graphsurgeon as gs

    casts = 0
    for node in [n for n in graph.nodes if id(n) in region]:
        for tensor in node.outputs:
            outside = [c for c in tensor.outputs if id(c) not in region]
            if not outside or tensor.dtype != np.float32:
                continue
            half = gs.Variable(f"{tensor.name}::fp16", dtype=np.float16)
            graph.nodes.append(gs.Node("Cast", attrs={"to": onnx.TensorProto.FLOAT16}, inputs=[tensor], outputs=[half]))
            for consumer in outside:
                for i, source in enumerate(consumer.inputs):
                    if source is tensor:
                        consumer.inputs[i] = half
            casts += 1
    return casts


def convert_constants(graph, region: set[int]) -> int:
    """FP32 constants outside `region` become FP16 (a copy where the region or a float-only input uses them too)."""
    import onnx_graphsurgeon as gs

    converted: dict[str, object] = {}
    for node in graph.nodes:
        for i, tensor in enumerate(node.inputs):
            if id(node) in region or not isinstance(tensor, gs.Constant) or tensor.values.dtype != np.float32 or keeps_float32(node, i):
                continue
            if tensor.name not in converted:
                shared = any(id(c) in region or any(keeps_float32(c, j) for j, t in enumerate(c.inputs) if t is tensor) for c in tensor.outputs)
                converted[tensor.name] = gs.Constant(f"{tensor.name}::fp16" if shared else tensor.name, tensor.values.astype(np.float16))
            node.inputs[i] = converted[tensor.name]
    return len(converted)


def to_float16(graph) -> int:
    """Convert an onnx-graphsurgeon graph (with known tensor dtypes) in place; returns the Casts inserted."""
    import onnx
    import onnx_graphsurgeon as gs

    region = timestep_region(graph)
    convert_constants(graph, region)
    for node in graph.nodes:
        if id(node) in region:
            continue
        if node.op == "Cast" and node.attrs["to"] == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
        if node.op == "ConstantOfShape" and "value" in node.attrs and node.attrs["value"].values.dtype == np.float32:
            value = node.attrs["value"]
            node.attrs["value"] = gs.Constant(value.name, value.values.astype(np.float16))
    casts = cast_region_outputs(graph, region)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.dtype == np.float32 and not any(id(p) in region for p in tensor.inputs):
            tensor.dtype = np.float16
    return casts
