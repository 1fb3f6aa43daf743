"""Optional fake quantization of the attention matmul inputs: q and k (q·kᵀ), softmax output and v (attn·v).

Each diffusers `Attention` gets four per-timestep activation quantizers (`matmul_quantizers`) and a
processor that computes attention explicitly (not through fused SDPA) so the probabilities can be
quantized. In FP (quantizers disabled) it computes what diffusers' AttnProcessor2_0 computes.
"""

from __future__ import annotations

import torch
from torch import nn

from .log_sqrt2 import LogSqrt2Quantizer
from .quantizer import ActQuantizer
from .timesteps import TimestepIndex

MATMUL_INPUTS = ("q", "k", "probs", "v")


class QuantAttnProcessor:
    """AttnProcessor2_0's computation with `attn.matmul_quantizers` applied to both matmuls' inputs."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:  # fmt: skip
        quantize = attn.matmul_quantizers
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scores = quantize["q"](query) @ quantize["k"](key).transpose(-1, -2) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = quantize["probs"](scores.float().softmax(dim=-1).to(query.dtype))
        hidden_states = (probs @ quantize["v"](value)).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def quantize_attention_matmuls(model: nn.Module, index: TimestepIndex, rows: int, bits: int, symmetric: bool,
                               head_tables: bool = False, softmax: str = "uniform") -> list[str]:  # fmt: skip
    """Give every diffusers Attention its matmul quantizers and the explicit processor; returns their names.
    `head_tables`: one table column per attention head (q, k, v and the probabilities are [batch, heads, ...]);
    `softmax`: the probabilities on a uniform table like the other inputs, or on RepQuant's log√2 levels."""
    from diffusers.models.attention_processor import Attention

    names = []
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            module.matmul_quantizers = nn.ModuleDict(
                {role: LogSqrt2Quantizer(bits) if role == "probs" and softmax == "log-sqrt2" else
                 ActQuantizer(index, rows, bits, symmetric, channel_dim=-1, heads=module.heads if head_tables else 1)
                 for role in MATMUL_INPUTS}  # fmt: skip
            )
            module.set_processor(QuantAttnProcessor())
            names += [f"{name}.attn_{role}" for role in MATMUL_INPUTS]
    return names


def matmul_quantizers(model: nn.Module, tables: bool = True) -> dict[str, ActQuantizer | LogSqrt2Quantizer]:
    """'<attention>.attn_<role>' -> quantizer, for every attention that has them (with `tables`, those with a
    calibrated table only: the log√2 softmax quantizer has none)."""
    return {f"{name}.attn_{role}": quantizer for name, module in model.named_modules()
            if isinstance(getattr(module, "matmul_quantizers", None), nn.ModuleDict)
            for role, quantizer in module.matmul_quantizers.items() if not tables or isinstance(quantizer, ActQuantizer)}  # fmt: skip
