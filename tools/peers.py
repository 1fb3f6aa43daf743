"""The quantizers a user would pick instead of dilatequant, each producing one ONNX graph that runs in ONNX
Runtime (the PEERS registry): ONNX Runtime's `quantize_static` (QDQ, per-channel weights), its `quantize_dynamic`
(int8 weights, activations quantized at run time: the dynamic baseline that needs no calibration and stores no
scales), and NVIDIA ModelOpt (torch `mtq.quantize`, exported with Q/DQ). The calibrating ones see the same inputs
as dilatequant: the (x_t, t, class) samples of a calibration artifact. All are imported on use: onnxruntime
comes with the `export` extra, ModelOpt with `bench`.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dilatequant.core.denoiser import LoadedModel
from dilatequant.core.optional import require

# name -> (calibration method, activation type, keep the boundary layers FP) for ONNX Runtime's quantize_static
ORT_VARIANTS = {
    "ort-minmax-int8": ("MinMax", "QInt8", False),
    "ort-minmax-uint8": ("MinMax", "QUInt8", False),
    "ort-percentile-int8": ("Percentile", "QInt8", False),
    "ort-percentile-uint8": ("Percentile", "QUInt8", False),
    "ort-percentile-uint8-fp-boundary": ("Percentile", "QUInt8", True),
}
# name -> (op types whose inputs are quantized at run time, keep the boundary layers FP) for quantize_dynamic;
# measured on digits (2-core CPU, batch 8): Linear only ~ FP32 latency, with Conv (ConvInteger) 2-4x slower
ORT_DYNAMIC_VARIANTS = {
    "ort-dynamic-int8": (("Conv", "MatMul", "Gemm"), False),
    "ort-dynamic-linear-int8": (("MatMul", "Gemm"), False),
    # like-for-like with dilatequant's and Q-DiT's FP boundary layers (on a DiT: the per-block timestep embedders)
    "ort-dynamic-linear-int8-fp-boundary": (("MatMul", "Gemm"), True),
}
# name -> (ModelOpt config, keep the boundary layers FP)
MODELOPT_VARIANTS = {
    "modelopt-int8": ("INT8_DEFAULT_CFG", False),
    "modelopt-int8-smoothquant": ("INT8_SMOOTHQUANT_CFG", False),
    "modelopt-int8-fp-boundary": ("INT8_DEFAULT_CFG", True),
}
CALIBRATION_BATCH = 16


def boundary_layers(loaded: LoadedModel) -> list[str]:
    """conv_in, conv_out, the time (and class) embedding...: what dilatequant's `--boundary fp` keeps FP, so
    that a peer can be run with the same exclusions."""
    from dilatequant.core.families import get_family
    from dilatequant.core.structure import input_groups

    patterns = get_family(loaded.denoiser.family).boundary_patterns
    return [layer for group in input_groups(loaded.denoiser.model, patterns) if group.boundary for layer in group.layers]


def calibration_batches(data, loaded: LoadedModel) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The artifact's calibration samples as (x, t, cond) batches."""
    batches = []
    for start in range(0, len(data.x), CALIBRATION_BATCH):
        rows = slice(start, start + CALIBRATION_BATCH)
        batches.append((data.x[rows], data.t[rows], loaded.denoiser.conditioning(data.labels[rows])))
    return batches


def ort_quantize(fp32_graph: Path, batches: list, method: str, activation: str, exclude: list[str]) -> object:
    """quantize_static on the FP32 graph: QDQ format, per-channel int8 weights, Conv/MatMul/Gemm, the nodes of
    the `exclude` layers left FP (the FP export names layer nodes after their layers); returns the quantized
    onnx ModelProto (weights loaded)."""
    onnx = require("onnx", "ONNX Runtime quantize_static", "export")
    q = require("onnxruntime.quantization", "ONNX Runtime quantize_static", "export")

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": x.numpy(), "t": t.numpy(), **({"cond": c.numpy()} if c is not None else {})} for x, t, c in batches])

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "quantized.onnx"
        q.quantize_static(str(fp32_graph), str(path), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          op_types_to_quantize=["Conv", "MatMul", "Gemm"], activation_type=getattr(q.QuantType, activation),
                          weight_type=q.QuantType.QInt8, calibrate_method=getattr(q.CalibrationMethod, method),
                          nodes_to_exclude=exclude, use_external_data_format=True)  # fmt: skip
        return onnx.load(str(path))


def modelopt_quantize(loaded: LoadedModel, batches: list, config_name: str, exclude: list[str]) -> object:
    """ModelOpt's INT8 recipe on the torch model, calibrated on `batches`, the quantizers of the `exclude`
    layers disabled, exported to ONNX with Q/DQ (its own exporter path: TorchScript); returns the onnx
    ModelProto."""
    mtq = require("modelopt.torch.quantization", "NVIDIA ModelOpt", "bench")
    onnx = require("onnx", "NVIDIA ModelOpt", "bench")
    from dilatequant.export.contract import INPUT_NAMES, OUTPUT_NAME
    from dilatequant.export.graph import ExportWrapper

    denoiser = loaded.denoiser

    def forward_loop(model) -> None:
        with torch.no_grad():
            for x, t, cond in batches:
                model(x, t, cond)

    config = copy.deepcopy(getattr(mtq, config_name))
    # appended entries override earlier ones; the Denoiser holds the diffusers model as `model`
    config["quant_cfg"] += [{"quantizer_name": f"*model.{layer}.*", "enable": False} for layer in exclude]
    mtq.quantize(denoiser, config, forward_loop)
    x, t, cond = batches[0]
    args = (x[:2], t[:2]) if cond is None else (x[:2], t[:2], cond[:2])
    names = list(INPUT_NAMES[: len(args)])
    with tempfile.TemporaryDirectory() as work, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(work) / "modelopt.onnx"
        torch.onnx.export(ExportWrapper(denoiser).eval(), args, str(path), input_names=names, output_names=[OUTPUT_NAME], opset_version=19,
                          dynamo=False, dynamic_axes={n: {0: "batch"} for n in [*names, OUTPUT_NAME]})  # fmt: skip
        return onnx.load(str(path))


def ort_quantize_dynamic(fp32_graph: Path, op_types: tuple[str, ...], exclude: list[str]) -> object:
    """quantize_dynamic on the FP32 graph: per-channel int8 weights, the inputs of `op_types` quantized at run time
    (DynamicQuantizeLinear + MatMulInteger / ConvInteger), the `exclude` layers left FP; returns the ModelProto."""
    onnx = require("onnx", "ONNX Runtime quantize_dynamic", "export")
    q = require("onnxruntime.quantization", "ONNX Runtime quantize_dynamic", "export")
    with tempfile.TemporaryDirectory() as work, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(work) / "dynamic.onnx"
        # quantize_dynamic splits each Gemm into MatMul + Add first and matches the exclusions against the new
        # MatMul's name, '<gemm>_MatMul' (ONNX Runtime 1.31): exclude both names
        exclude = [*exclude, *(f"{name}_MatMul" for name in exclude)]
        q.quantize_dynamic(str(fp32_graph), str(path), per_channel=True, weight_type=q.QuantType.QInt8,
                           op_types_to_quantize=list(op_types), nodes_to_exclude=exclude, use_external_data_format=True)  # fmt: skip
        return onnx.load(str(path))


@dataclass(frozen=True)
class Peer:
    quantize: Callable[[LoadedModel, list, Path], object]  # (fresh model, calibration batches, FP32 graph) -> ModelProto
    calibrates: bool = True  # reads the calibration samples


def excluded(loaded: LoadedModel, fp_boundary: bool) -> list[str]:
    return boundary_layers(loaded) if fp_boundary else []


def static_peer(method: str, activation: str, fp_boundary: bool) -> Peer:
    return Peer(lambda loaded, batches, graph: ort_quantize(graph, batches, method, activation, excluded(loaded, fp_boundary)))


def dynamic_peer(op_types: tuple[str, ...], fp_boundary: bool) -> Peer:
    return Peer(lambda loaded, batches, graph: ort_quantize_dynamic(graph, op_types, excluded(loaded, fp_boundary)), calibrates=False)


def modelopt_peer(config_name: str, fp_boundary: bool) -> Peer:
    return Peer(lambda loaded, batches, graph: modelopt_quantize(loaded, batches, config_name, excluded(loaded, fp_boundary)))


PEERS: dict[str, Peer] = {
    **{name: static_peer(*settings) for name, settings in ORT_VARIANTS.items()},
    **{name: dynamic_peer(*settings) for name, settings in ORT_DYNAMIC_VARIANTS.items()},
    **{name: modelopt_peer(*settings) for name, settings in MODELOPT_VARIANTS.items()},
}
