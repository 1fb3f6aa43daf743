"""Attention computed explicitly (q·kᵀ·scale → softmax → ·v), not through fused SDPA, so that both matmuls' inputs
are tensors one can quantize: calibrate/ fake-quantizes them, export/ writes Q/DQ on them.

`ExplicitAttnProcessor` computes what diffusers' AttnProcessor2_0 computes. It applies `attn.matmul_quantizers`
(a ModuleDict keyed by MATMUL_INPUTS) where an Attention has them, and is the identity on them otherwise: export
sets it on the FP model, so each attention exports as MatMul(q, kᵀ) → Mul(scale) → Softmax → MatMul(probs, v)
under the Attention's scope, the graph calibrate's fake-quant model computes.
"""

from __future__ import annotations

import torch
from torch import nn

MATMUL_INPUTS = ("q", "k", "probs", "v")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> every diffusers Attention of `model`."""
    from diffusers.models.attention_processor import Attention

    return {name: module for name, module in model.named_modules() if isinstance(module, Attention)}


def use_explicit_attention(model: nn.Module) -> list[str]:
    """Give every Attention the explicit processor; returns their names."""
    modules = attention_modules(model)
    for module in modules.values():
        module.set_processor(ExplicitAttnProcessor())
    return list(modules)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


class ExplicitAttnProcessor:
    """AttnProcessor2_0's computation with the matmul inputs exposed (and quantized where `attn` has quantizers)."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:  # fmt: skip
        quantize = getattr(attn, "matmul_quantizers", None) or dict.fromkeys(MATMUL_INPUTS, identity)
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
        # the scale after the matmul: a Q/DQ on q and kᵀ then feeds the MatMul directly (QLinearMatMul, fused MHA)
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
