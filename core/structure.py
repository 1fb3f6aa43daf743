"""Everything dilatequant knows about the structure of diffusers denoisers, in one adapter module.

- which Conv2d/Linear layers are quantized, and which of them read the same input (one shared
  activation quantizer and one dilation vector: the Q/K/V projections of an attention);
- which layers are "boundary" layers (conv_in, conv_out, time embeddings, DiT patch embedding and output),
  kept at 8 bits or in FP by configuration;
- where the 1/s of weight dilation folds exactly into a predecessor (an affine norm, or the V projection
  before an attention's output projection); every other input gets a pre-scale instead;
- where RepQuant's per-channel scale and offset of a post-norm activation fold exactly (an affine norm, or DiT's
  adaLN-Zero modulation Linear), and which post-norm inputs have nothing to fold into.
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


# fold(s[, offset]): the predecessor's output channel c becomes y_c / s_c (- offset_c, at post-norm sites)
Fold = Callable[..., None]


def divide_norm(norm: nn.Module) -> Fold:
    """A fold into an affine norm's weight and bias."""

    def fold(s: torch.Tensor, offset: torch.Tensor | None = None) -> None:
        norm.weight.data /= s
        norm.bias.data /= s
        if offset is not None:
            norm.bias.data -= offset

    return fold


def divide_rows(layer: nn.Linear) -> Fold:
    """A fold into a Linear's output rows (weight rows and bias); scale only (dilation's V sites)."""

    def fold(s: torch.Tensor) -> None:
        layer.weight.data /= s[:, None]
        if layer.bias is not None:
            layer.bias.data /= s

    return fold


def divide_modulation(linear: nn.Linear, shift: int, scale: int) -> Fold:
    """A fold into adaLN-Zero's modulation Linear, whose output chunks `shift` and `scale` (of 6) act on a norm's output
    as `x * (1 + scale) + shift`: dividing that by s and subtracting an offset makes shift' = shift / s - offset and
    1 + scale' = (1 + scale) / s, both rows of the Linear (weights and bias)."""
    dim = linear.out_features // 6
    rows = {name: slice(chunk * dim, (chunk + 1) * dim) for name, chunk in (("shift", shift), ("scale", scale))}

    def fold(s: torch.Tensor, offset: torch.Tensor | None = None) -> None:
        for name, part in rows.items():
            linear.weight.data[part] /= s[:, None]
            linear.bias.data[part] /= s
        linear.bias.data[rows["scale"]] += 1 / s - 1
        if offset is not None:
            linear.bias.data[rows["shift"]] -= offset

    return fold


Sites = dict[str, tuple[str, Fold]]  # group name -> (predecessor name, fold)


def norm_sites(model: nn.Module) -> Sites:
    """Inputs that an affine norm feeds directly: attention group norms, LayerNorm transformer blocks' norms, a
    Transformer2DModel's input norm."""
    attention, transformer_block, transformer_2d = _attention_classes()
    groups = {g.name for g in input_groups(model)}
    sites: Sites = {}
    for name, module in model.named_modules():
        if isinstance(module, attention):
            if not module.is_cross_attention and module.spatial_norm is None and _affine(module.group_norm):
                sites[f"{name}.qkv"] = (f"{name}.group_norm", divide_norm(module.group_norm))
        elif isinstance(module, transformer_block) and module.norm_type == "layer_norm" and module.pos_embed is None:
            for norm_name, group in post_norm_inputs(module):
                if _affine(getattr(module, norm_name)) and f"{name}.{group}" in groups:
                    sites[f"{name}.{group}"] = (f"{name}.{norm_name}", divide_norm(getattr(module, norm_name)))
        elif isinstance(module, transformer_2d) and module.is_input_continuous and _affine(module.norm):
            sites[f"{name}.proj_in"] = (f"{name}.norm", divide_norm(module.norm))
    return sites


def post_norm_inputs(block: nn.Module) -> list[tuple[str, str]]:
    """A LayerNorm transformer block's (norm, the input group it feeds) pairs."""
    pairs = [("norm1", "attn1.qkv" if not block.only_cross_attention else None),
             ("norm2", "attn2.to_q" if block.attn2 is not None and block.attn2.is_cross_attention else None),
             ("norm3", "ff.net.0.proj")]  # fmt: skip
    return [(norm, group) for norm, group in pairs if group]


def value_sites(model: nn.Module) -> Sites:
    """Attention output projections, whose input is linear per channel in V (the rows of the probabilities sum to 1)."""
    attention, _, _ = _attention_classes()
    groups = {g.name for g in input_groups(model)}
    return {f"{name}.to_out.0": (f"{name}.to_v", divide_rows(module.to_v)) for name, module in model.named_modules()
            if isinstance(module, attention) and isinstance(module.to_v, nn.Linear) and f"{name}.to_out.0" in groups}  # fmt: skip


def modulation_sites(model: nn.Module) -> Sites:
    """DiT's adaLN-Zero blocks: the self-attention and feed-forward inputs, folded into the modulation Linear."""
    _, transformer_block, _ = _attention_classes()
    sites: Sites = {}
    for name, module in model.named_modules():
        if isinstance(module, transformer_block) and module.norm_type == "ada_norm_zero" and module.norm1.linear.bias is not None:
            linear = f"{name}.norm1.linear"
            if not module.only_cross_attention and module.pos_embed is None:
                sites[f"{name}.attn1.qkv"] = (linear, divide_modulation(module.norm1.linear, shift=0, scale=1))
            sites[f"{name}.ff.net.0.proj"] = (linear, divide_modulation(module.norm1.linear, shift=3, scale=4))
    return sites


def fold_sites(model: nn.Module) -> Sites:
    """Where dividing a group's input by s (weight dilation) is exact: nothing nonlinear lies between predecessor and
    consumers (an affine norm feeding the projections directly, or V feeding the output projection). DiT's
    modulations are left out: DilateQuant's recipes were measured with pre-scales there."""
    return {**norm_sites(model), **value_sites(model)}


def post_norm_sites(model: nn.Module) -> tuple[Sites, dict[str, str]]:
    """RepQuant's post-norm activations: where a per-channel scale and offset fold exactly (affine norms, adaLN-Zero
    modulations), and the transformer-block inputs that follow a norm with nothing to fold into (group -> reason)."""
    _, transformer_block, _ = _attention_classes()
    sites = {**norm_sites(model), **modulation_sites(model)}
    refused = {}
    for name, block in model.named_modules():
        if not isinstance(block, transformer_block) or block.norm_type == "ada_norm_zero":
            continue
        if block.norm_type != "layer_norm":
            refused[f"{name}.ff.net.0.proj"] = f"{name} uses norm_type {block.norm_type!r}: no per-block modulation Linear to fold into"
            continue
        for norm, group in post_norm_inputs(block):
            why = "a positional embedding lies between it and the projections" if block.pos_embed is not None else "it has no affine weights"
            if f"{name}.{group}" not in sites:
                refused[f"{name}.{group}"] = f"nothing to fold into after {name}.{norm}: {why}"
    return sites, refused


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
