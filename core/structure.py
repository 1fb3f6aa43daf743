"""Everything dilatequant knows about the structure of diffusers denoisers, in one adapter module.

- which Conv2d/Linear layers are quantized, and which of them read the same input (one shared
  activation quantizer and one dilation vector: the Q/K/V projections of an attention);
- which layers are "boundary" layers (conv_in, conv_out, time embeddings, DiT patch embedding and output),
  kept at 8 bits or in FP by configuration;
- where the 1/s of weight dilation folds exactly into a predecessor (an affine norm, or the V projection
  before an attention's output projection); every other input gets a pre-scale instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# Layer names (relative to the diffusers model) of the boundary layers: diffusers names them alike in all three
# families (core/families.py gives each family its patterns).
DIFFUSERS_BOUNDARY = (
    r"^conv_in$", r"^conv_out$", r"^time_embedding\.", r"^pos_embed\.proj$", r"^proj_out(_\d)?$",
    r"\.timestep_embedder\.", r"^class_embedding\.",
)  # fmt: skip


@dataclass
class InputGroup:
    """Layers that consume the same activation: one activation quantizer, one dilation vector."""

    name: str
    layers: list[str] = field(default_factory=list)
    boundary: bool = False


def is_boundary(layer_name: str, patterns: tuple[str, ...] = DIFFUSERS_BOUNDARY) -> bool:
    return any(re.search(pattern, layer_name) for pattern in patterns)


def _attention_classes() -> tuple[type, type, type]:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return Attention, BasicTransformerBlock, Transformer2DModel


def shared_input_groups(model: nn.Module) -> dict[str, str]:
    """layer name -> group name for layers that share an input (attention Q/K/V, cross-attention K/V)."""
    attention, _, _ = _attention_classes()
    groups: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, attention):
            shared = ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v")
            for proj in shared:
                if isinstance(getattr(module, proj, None), nn.Linear):
                    groups[f"{name}.{proj}"] = f"{name}.{''.join(p[-1] for p in shared)}"
    return groups


def input_groups(model: nn.Module, boundary: tuple[str, ...] = DIFFUSERS_BOUNDARY) -> list[InputGroup]:
    """Every Conv2d/Linear of the model, grouped by shared input, in module order; `boundary`: the family's
    boundary-layer patterns."""
    shared = shared_input_groups(model)
    groups: dict[str, InputGroup] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            group = groups.setdefault(shared.get(name, name), InputGroup(shared.get(name, name)))
            group.layers.append(name)
            group.boundary = group.boundary or is_boundary(name, boundary)
    return list(groups.values())


def _affine(norm: nn.Module | None) -> bool:
    return isinstance(norm, (nn.GroupNorm, nn.LayerNorm)) and norm.weight is not None and norm.bias is not None


def divide_norm(norm: nn.Module) -> Callable[[torch.Tensor], None]:
    """A fold that divides an affine norm's output channel c by s_c (its weight and bias)."""

    def fold(s: torch.Tensor) -> None:
        norm.weight.data /= s
        norm.bias.data /= s

    return fold


def divide_rows(layer: nn.Linear) -> Callable[[torch.Tensor], None]:
    """A fold that divides a Linear's output channel c by s_c (weight rows and bias)."""

    def fold(s: torch.Tensor) -> None:
        layer.weight.data /= s[:, None]
        if layer.bias is not None:
            layer.bias.data /= s

    return fold


def fold_sites(model: nn.Module) -> dict[str, tuple[str, Callable[[torch.Tensor], None]]]:
    """group name -> (predecessor name, fold) where dividing the group's input by s is exact.

    Exact because nothing nonlinear lies between predecessor and consumers: an affine norm feeding the
    projections directly, or V feeding the output projection through attention (linear in V per channel).
    """
    attention, transformer_block, transformer_2d = _attention_classes()
    groups = {g.name for g in input_groups(model)}
    sites: dict[str, tuple[str, Callable[[torch.Tensor], None]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, attention):
            if not module.is_cross_attention and module.spatial_norm is None and _affine(module.group_norm):
                sites[f"{name}.qkv"] = (f"{name}.group_norm", divide_norm(module.group_norm))
            if isinstance(module.to_v, nn.Linear) and f"{name}.to_out.0" in groups:
                sites[f"{name}.to_out.0"] = (f"{name}.to_v", divide_rows(module.to_v))
        elif isinstance(module, transformer_block) and module.norm_type == "layer_norm" and module.pos_embed is None:
            pairs = [("norm1", "attn1.qkv" if not module.only_cross_attention else None),
                     ("norm2", "attn2.to_q" if module.attn2 is not None and module.attn2.is_cross_attention else None),
                     ("norm3", "ff.net.0.proj")]  # fmt: skip
            for norm_name, group in pairs:
                if group and _affine(getattr(module, norm_name)) and f"{name}.{group}" in groups:
                    sites[f"{name}.{group}"] = (f"{name}.{norm_name}", divide_norm(getattr(module, norm_name)))
        elif isinstance(module, transformer_2d) and module.is_input_continuous and _affine(module.norm):
            sites[f"{name}.proj_in"] = (f"{name}.norm", divide_norm(module.norm))
    return sites


def _block_types() -> tuple[type, ...]:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.upsampling import Upsample2D

    return (ResnetBlock2D, Attention, Transformer2DModel, BasicTransformerBlock, Downsample2D, Upsample2D,
            TimestepEmbedding, PatchEmbed)  # fmt: skip


def distillation_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks of block-wise distillation, in the order the model calls them.

    A block is the outermost ResNet block, attention / transformer block, down- or upsampler, time
    embedding or patch embedding; every Conv2d/Linear outside all of them (conv_in, conv_out, DiT's
    output projections) is a block of its own. Order comes from one traced forward pass.
    """
    types, blocks = _block_types(), []
    for name, module in model.named_modules():
        if name and isinstance(module, types) and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not any(name == b or name.startswith(b + ".") for b in blocks):
            blocks.append(name)
    return blocks


def unet_feature_site(model: nn.Module) -> str:
    """The module whose input is a UNet's middle feature map: the mid-block attention (EDA-DM's choice), or the
    mid block itself when it has no attention."""
    attentions = getattr(model.mid_block, "attentions", None) or [None]
    return "mid_block.attentions.0" if attentions[0] is not None else "mid_block"


def dit_feature_site(model: nn.Module) -> str:
    """The module whose input is a DiT's middle feature map: the middle transformer block."""
    return f"transformer_blocks.{len(model.transformer_blocks) // 2}"


def call_order(names: list[str], modules: dict[str, nn.Module], run: Callable[[], object]) -> list[str]:
    """`names` sorted by when `run()` first calls each module; modules never called are dropped."""
    order: list[str] = []
    handles = [modules[name].register_forward_pre_hook(lambda m, a, name=name: order.append(name) if name not in order else None)
               for name in names]  # fmt: skip
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return order
