"""The export profiles registry: what a deployment target needs of the Q/DQ graphs (DESIGN.md §4).

Export, lint and the CLI read a profile's properties instead of comparing its name; a new target (e.g.
ONNX Runtime with dynamic activations) is a new entry here plus whatever graph pass it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from dilatequant.core.errors import UserError


@dataclass(frozen=True)
class ExportProfile:
    name: str
    description: str
    float_precision: str | None  # forced precision of the unquantized parts; None: fp16 unless ExportConfig.fp32
    qdq_per_consumer: bool  # one QuantizeLinear/DequantizeLinear pair per consuming node, not per tensor
    unsigned_activations: bool  # uint8 activations (zero point 128 for symmetric ranges) instead of int8
    quantize_fused_outputs: bool  # Q/DQ on quantized Conv/Gemm outputs, so the runtime fuses integer kernels
    pack_int4_weights: bool  # 4-bit weights stored as INT4 (TensorRT); else int8 holding 4-bit values
    lint: str  # the rule set `dilatequant lint` checks: 'static-qdq' or 'ort-fusion' (export/lint.py)
    # how group-wise Linear weights (Q-DiT) are written: 'matmulnbits' (ONNX Runtime's MatMulNBits), 'blocked-dq'
    # (symmetric integers behind a block-quantized DequantizeLinear, opset 21), or None: refused
    group_weights: str | None = None
    # dynamic per-token-group activations run in the group-wise layers (MatMulNBits accuracy_level 4)
    dynamic_activations: bool = False


PROFILES = {
    "tensorrt": ExportProfile(
        "tensorrt", "TensorRT: one shared symmetric int8 Q/DQ per tensor, FP16 elsewhere (--fp32 to keep FP32)",
        float_precision=None, qdq_per_consumer=False, unsigned_activations=False, quantize_fused_outputs=False,
        pack_int4_weights=True, lint="static-qdq", group_weights="blocked-dq"),
    "ort-cpu": ExportProfile(
        "ort-cpu", "ONNX Runtime CPU: uint8 activations, one Q/DQ per consumer, quantized Conv/Gemm outputs so they "
        "fuse into QLinearConv/QGemm; FP32 elsewhere (ONNX Runtime's CPU kernels have no FP16)",
        float_precision="fp32", qdq_per_consumer=True, unsigned_activations=True, quantize_fused_outputs=True,
        pack_int4_weights=False, lint="ort-fusion"),
    "ort-dynamic": ExportProfile(
        "ort-dynamic", "ONNX Runtime CPU with Q-DiT's formats: group-wise Linear weights as MatMulNBits (4/8-bit, blocks "
        "of 16-256), their inputs quantized at run time per token and block to int8 (accuracy_level 4); the other "
        "quantized layers as in ort-cpu",
        float_precision="fp32", qdq_per_consumer=True, unsigned_activations=True, quantize_fused_outputs=True,
        pack_int4_weights=False, lint="ort-fusion", group_weights="matmulnbits", dynamic_activations=True),
}  # fmt: skip


def get_profile(name: str) -> ExportProfile:
    if name not in PROFILES:
        raise UserError(f"Unknown profile '{name}'; choose one of {', '.join(PROFILES)}.")
    return PROFILES[name]
