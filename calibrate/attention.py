"""Optional fake quantization of the attention matmul inputs: q and k (q·kᵀ), softmax output and v (attn·v).

Each diffusers `Attention` gets four per-timestep activation quantizers (`matmul_quantizers`) and core's
explicit processor (core/attention.py), which applies them; export writes the same graph with Q/DQ.
"""

from __future__ import annotations

from torch import nn

from dilatequant.core.attention import MATMUL_INPUTS, ExplicitAttnProcessor, attention_modules

from .log_sqrt2 import LogSqrt2Quantizer
from .quantizer import ActQuantizer
from .timesteps import TimestepIndex


def quantize_attention_matmuls(model: nn.Module, index: TimestepIndex, rows: int, bits: int, symmetric: bool,
                               head_tables: bool = False, softmax: str = "uniform") -> list[str]:  # fmt: skip
    """Give every diffusers Attention its matmul quantizers and the explicit processor; returns their names.
    `head_tables`: one table column per attention head (q, k, v and the probabilities are [batch, heads, ...]);
    `softmax`: the probabilities on a uniform table like the other inputs, or on RepQuant's log√2 levels."""
    names = []
    for name, module in attention_modules(model).items():
        module.matmul_quantizers = nn.ModuleDict(
            {role: LogSqrt2Quantizer(bits) if role == "probs" and softmax == "log-sqrt2" else
             ActQuantizer(index, rows, bits, symmetric, channel_dim=-1, heads=module.heads if head_tables else 1)
             for role in MATMUL_INPUTS}  # fmt: skip
        )
        module.set_processor(ExplicitAttnProcessor())
        names += [f"{name}.attn_{role}" for role in MATMUL_INPUTS]
    return names


def matmul_quantizers(model: nn.Module, tables: bool = True) -> dict[str, ActQuantizer | LogSqrt2Quantizer]:
    """'<attention>.attn_<role>' -> quantizer, for every attention that has them (with `tables`, those with a
    calibrated table only: the log√2 softmax quantizer has none)."""
    return {f"{name}.attn_{role}": quantizer for name, module in model.named_modules()
            if isinstance(getattr(module, "matmul_quantizers", None), nn.ModuleDict)
            for role, quantizer in module.matmul_quantizers.items() if not tables or isinstance(quantizer, ActQuantizer)}  # fmt: skip


def uniform_softmax(model: nn.Module, bits: int, symmetric: bool) -> list[str]:
    """Replace every log√2 softmax quantizer by a uniform table quantizer with the rows of the same attention's q
    quantizer, left for the caller to initialise: the form ONNX Runtime and TensorRT run (neither has a log-domain
    kernel). Returns the replaced quantizers' names."""
    names = []
    for name, module in attention_modules(model).items():
        quantizers = getattr(module, "matmul_quantizers", None)
        if quantizers is not None and isinstance(quantizers["probs"], LogSqrt2Quantizer):
            q = quantizers["q"]
            quantizers["probs"] = ActQuantizer(q.index, len(q.step), bits, symmetric, channel_dim=-1).to(q.step.device)
            names.append(f"{name}.attn_probs")
    return names
