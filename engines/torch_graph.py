"""An ONNX graph executed operator by operator with PyTorch: a reference executor for deployed Q/DQ graphs.

QuantizeLinear/DequantizeLinear run as float fake quantization with ONNX's semantics (round half to even,
saturation to the zero point's integer type, per-tensor, per-axis or blocked scales); every other operator is its torch
equivalent. This lets the deployed graphs of any toolchain (dilatequant's bucket graphs, ONNX Runtime
quantize_static, ModelOpt) be sampled on a GPU that has no TensorRT, at the n a quality measurement needs.
It computes in the graph's own types with TF32 off; what differs from ONNX Runtime is float summation order
(and an integer engine's requantization), which now and then flips a rounding decision at an exact tie
(measured against ONNX Runtime's reference kernels in tests/test_torch_backend.py).

Operators are those the exports of UNet2DModel, UNet2DConditionModel and DiT use, ONNX Runtime's and
ModelOpt's Q/DQ graphs included; any other raises an error that names it. Constant subgraphs (weight
DequantizeLinear, shape arithmetic on initializers) are folded once at load.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dilatequant.core.manifest import ArtifactError
from dilatequant.core.optional import require

# ONNX TensorProto data types -> torch dtypes (4-bit initializers are widened at load: INT4 to int8, UINT4 to uint8)
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64, 9: torch.bool,
          10: torch.float16, 11: torch.float64, 16: torch.bfloat16, 21: torch.uint8, 22: torch.int8}  # fmt: skip
INTEGER_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int32: (-(2**31), 2**31 - 1)}
WIDENED = {22: np.int8, 21: np.uint8}  # INT4, UINT4


def attributes(node) -> dict:
    from onnx import helper

    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def axis_view(values: torch.Tensor, rank: int, axis: int, block_size: int = 0, length: int = 0) -> torch.Tensor:
    """A per-axis parameter (scale or zero point) shaped to broadcast along `axis` of a rank-`rank` tensor; with
    `block_size` (blocked quantization, opset 21), a full-rank parameter whose `axis` holds one entry per block of
    `block_size` elements, repeated to the `length` of that axis."""
    if block_size:
        return values.repeat_interleave(block_size, dim=axis % rank).narrow(axis % rank, 0, length)
    if values.dim() == 0:
        return values
    shape = [1] * rank
    shape[axis % rank] = -1
    return values.reshape(shape)


def scale_view(x: torch.Tensor, axis: int, block_size: int):
    """axis_view for the scales and zero points of x (the axis need not exist for a per-tensor scale)."""
    return functools.partial(axis_view, rank=x.dim(), axis=axis, block_size=block_size, length=x.shape[axis] if block_size else 0)


def quantize_linear(x, scale, zero_point=None, axis=1, saturate=1, output_dtype=0, block_size=0):
    dtype = zero_point.dtype if zero_point is not None else DTYPES.get(output_dtype, torch.uint8)
    low, high = INTEGER_RANGES[dtype]
    view = scale_view(x, axis, block_size)
    zero = 0.0 if zero_point is None else view(zero_point).float()
    q = torch.round(x.float() / view(scale).float()) + zero
    return q.clamp(low, high).to(dtype)


def dequantize_linear(q, scale, zero_point=None, axis=1, block_size=0):
    view = scale_view(q, axis, block_size)
    zero = 0.0 if zero_point is None else view(zero_point).float()
    return ((q.float() - zero) * view(scale).float()).to(scale.dtype)


def conv(x, w, b=None, group=1, pads=None, strides=None, dilations=None, auto_pad="NOTSET", kernel_shape=None):
    if auto_pad != "NOTSET":
        raise ArtifactError(f"Conv with auto_pad={auto_pad} is not supported by the torch backend; export with explicit pads.")
    spatial = x.dim() - 2
    pads = pads or [0] * (2 * spatial)
    begin, end = pads[:spatial], pads[spatial:]
    if begin != end:  # F.conv pads symmetrically; pad explicitly (last dimension first, as F.pad wants)
        x = F.pad(x, [p for i in reversed(range(spatial)) for p in (begin[i], end[i])])
        begin = [0] * spatial
    function = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return function(x, w, b, stride=strides or 1, padding=begin, dilation=dilations or 1, groups=group)


def gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    y = alpha * ((a.T if transA else a) @ (b.T if transB else b))
    return y if c is None else y + beta * c


def resize(x, roi=None, scales=None, sizes=None, mode="nearest", coordinate_transformation_mode="half_pixel",
           nearest_mode="round_prefer_floor", axes=None, **_):  # fmt: skip
    if axes is not None:
        raise ArtifactError("Resize with `axes` is not supported by the torch backend (scales/sizes must cover every axis).")
    if mode != "nearest" or coordinate_transformation_mode != "asymmetric" or nearest_mode != "floor":
        raise ArtifactError(f"Resize mode={mode}/{coordinate_transformation_mode}/{nearest_mode} is not supported by the torch "
                            "backend (only nearest/asymmetric/floor, what diffusers' upsamplers export).")  # fmt: skip
    if sizes is not None and sizes.numel():
        return F.interpolate(x, size=[int(s) for s in sizes[2:]], mode="nearest")
    return F.interpolate(x, scale_factor=[float(s) for s in scales[2:]], mode="nearest")


def reshape(x, shape, allowzero=0):
    shape = [x.shape[i] if s == 0 and not allowzero else int(s) for i, s in enumerate(shape.tolist())]
    return x.reshape(shape)


def slice_(x, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else axes.tolist()
    steps = [1] * len(starts) if steps is None else steps.tolist()
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes, steps):
        if step < 0:
            raise ArtifactError("Slice with negative steps is not supported by the torch backend.")
        index[axis] = slice(start, min(end, x.shape[axis]), step)
    return x[tuple(index)]


def split(x, split=None, axis=0, num_outputs=None):
    if split is not None:
        return list(torch.split(x, split.tolist(), dim=axis))
    return list(torch.tensor_split(x, num_outputs, dim=axis))


def divide(a, b):
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates


def constant_of_shape(shape, value=None):
    fill = torch.from_numpy(numpy_value(value).copy()) if value is not None else torch.zeros(1)
    return fill.to(shape.device).reshape(()).expand(*shape.tolist()).clone()


def numpy_value(tensor) -> np.ndarray:
    from onnx import numpy_helper

    values = numpy_helper.to_array(tensor)
    return values.astype(WIDENED[tensor.data_type]) if tensor.data_type in WIDENED else values


def gather(x, indices, axis=0):
    axis = axis % x.dim()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)  # ONNX allows negative indices
    picked = torch.index_select(x, axis, indices.reshape(-1))
    return picked.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1 :])


def layer_norm(x, scale, bias=None, axis=-1, epsilon=1e-5, stash_type=1):
    return F.layer_norm(x, x.shape[axis:], scale, bias, epsilon)


def reduce_mean(x, axes=None, keepdims=1, noop_with_empty_axes=0):
    if axes is None or axes.numel() == 0:
        return x if noop_with_empty_axes else x.mean(keepdim=bool(keepdims))
    return x.mean(dim=axes.tolist(), keepdim=bool(keepdims))


def unsqueeze(x: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    rank = x.dim() + axes.numel()
    for axis in sorted(a % rank for a in axes.tolist()):
        x = x.unsqueeze(axis)
    return x


OPS: dict[str, Callable] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": divide, "Pow": torch.pow, "Neg": torch.neg,
    "Sqrt": torch.sqrt, "Exp": torch.exp, "Sin": torch.sin, "Cos": torch.cos, "Erf": torch.erf, "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid, "Relu": torch.relu, "Equal": torch.eq, "Where": torch.where, "Identity": lambda x: x,
    "MatMul": torch.matmul, "Einsum": lambda *xs, equation: torch.einsum(equation, *xs), "Gemm": gemm, "Conv": conv,
    "Resize": resize, "Reshape": reshape, "Slice": slice_, "Split": split, "LayerNormalization": layer_norm,
    "ReduceMean": reduce_mean, "Gather": gather, "Unsqueeze": unsqueeze, "ConstantOfShape": constant_of_shape,
    "Softmax": lambda x, axis=-1: torch.softmax(x, axis),
    "Gelu": lambda x, approximate="none": F.gelu(x, approximate=approximate),
    "InstanceNormalization": lambda x, scale, bias, epsilon=1e-5: F.instance_norm(x, weight=scale, bias=bias, eps=epsilon),
    "Transpose": lambda x, perm=None: x.permute(perm) if perm is not None else x.permute(*reversed(range(x.dim()))),
    "Concat": lambda *xs, axis: torch.cat(xs, axis),
    "Shape": lambda x, start=0, end=None: torch.tensor(x.shape[start:end], dtype=torch.int64, device=x.device),
    "Cast": lambda x, to, saturate=1: x.to(DTYPES[to]),
    "Squeeze": lambda x, axes=None: x.squeeze() if axes is None else x.squeeze(tuple(axes.tolist())),
    "Expand": lambda x, shape: x.expand(torch.broadcast_shapes(x.shape, tuple(shape.tolist()))),
    "Range": lambda start, limit, delta: torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device),
    "QuantizeLinear": quantize_linear, "DequantizeLinear": dequantize_linear,
}


@contextlib.contextmanager
def full_fp32_math():
    """TF32 off while a graph runs (restored after): the reference must compute what the graph says."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass(frozen=True)
class Step:
    """One node, resolved once at load: its function, attributes, and the activations it is the last to read."""

    run: Callable
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict
    frees: tuple[str, ...] = ()

    @classmethod
    def of(cls, node) -> Step:
        inputs = list(node.input)
        while inputs and not inputs[-1]:  # trailing optional inputs left out
            inputs.pop()
        attrs = attributes(node)
        if node.op_type == "Constant":
            value = torch.from_numpy(numpy_value(attrs.pop("value")).copy())
            return cls(lambda: value, (), tuple(node.output), {})
        return cls(OPS[node.op_type], tuple(inputs), tuple(node.output), attrs)

    def __call__(self, values: dict[str, torch.Tensor]) -> None:
        outputs = self.run(*[values[name] if name else None for name in self.inputs], **self.attrs)
        values.update(zip(self.outputs, outputs if isinstance(outputs, list) else [outputs]))
        for name in self.frees:
            del values[name]


class TorchGraph:
    """One ONNX graph loaded onto a torch device; `graph(**inputs)` returns its first output."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        model = require("onnx", "torch engines", "export").load(str(path))
        self.device = torch.device(device)
        unsupported = sorted({n.op_type for n in model.graph.node if n.op_type not in OPS and n.op_type != "Constant"})
        if unsupported:
            raise ArtifactError(f"{path} uses operators the torch backend does not implement: {', '.join(unsupported)}. "
                                "Build it with the onnxruntime backend instead.")  # fmt: skip
        initializers = {i.name for i in model.graph.initializer}
        self.input_dtypes = {i.name: DTYPES[i.type.tensor_type.elem_type] for i in model.graph.input if i.name not in initializers}
        self.output_name = model.graph.output[0].name
        constants = {i.name: torch.from_numpy(numpy_value(i).copy()).to(self.device) for i in model.graph.initializer}
        self.constants, steps = fold_constants([Step.of(node) for node in model.graph.node], constants, self.device)
        self.steps = with_frees(steps, set(self.constants) | {self.output_name})

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        values = {**self.constants, **{name: value.to(self.device) for name, value in inputs.items()}}
        with torch.inference_mode(), full_fp32_math():
            for step in self.steps:
                step(values)
        return values[self.output_name]


def fold_constants(steps: list[Step], constants: dict, device: torch.device) -> tuple[dict, list[Step]]:
    """Run every step whose inputs are all constants once (weight DequantizeLinear, shape arithmetic on
    initializers); returns the grown constants and the steps left to run per call."""
    remaining = []
    with torch.inference_mode(), full_fp32_math():
        for step in steps:
            if all(not name or name in constants for name in step.inputs):
                step(constants)
                constants.update({name: constants[name].to(device) for name in step.outputs})
            else:
                remaining.append(step)
    return constants, remaining


def with_frees(steps: list[Step], kept: set[str]) -> list[Step]:
    """The steps, each freeing the activations it reads last (so a call holds only live tensors)."""
    last = {name: i for i, step in enumerate(steps) for name in step.inputs if name and name not in kept}
    return [replace(step, frees=tuple(n for n in dict.fromkeys(step.inputs) if last.get(n) == i)) for i, step in enumerate(steps)]
