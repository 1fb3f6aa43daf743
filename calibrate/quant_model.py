"""The fake-quantized denoiser: Conv2d/Linear layers wrapped with weight and per-timestep input quantizers.

Built in explicit phases — `dilate` (fresh calibration only), `wrap_layers`, then initialisation and
distillation elsewhere — and rebuilt from an artifact by `wrap_layers` alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dilatequant.core.denoiser import Denoiser
from dilatequant.core.families import Family, get_family
from dilatequant.core.sampling import CPU_BATCH_SIZE
from dilatequant.core.structure import InputGroup, input_groups

from .attention import matmul_quantizers, quantize_attention_matmuls
from .calib_data import CalibrationData
from .config import CalibConfig
from .dilation import DilationRecord, dilate_group
from .groupwise import DynamicActQuantizer, GroupWeightQuantizer, check_group_size
from .quantizer import ActQuantizer, WeightQuantizer
from .reparameterisation import reparameterise_post_norm
from .timesteps import TimestepIndex

BOUNDARY_BITS = 8
OUTPUT_SUFFIX = "::output"


class QuantLayer(nn.Module):
    """A Conv2d or Linear whose input and weight pass through fake quantizers: per-timestep tables and per-channel
    weights, or (Q-DiT, Linear only) dynamic per-token-group inputs and group-wise weights.

    An `output_quantizer` is attached only for deployments that quantize layer outputs too (ONNX Runtime
    fuses DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv only with the output quantized).
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, input_quantizer: ActQuantizer | DynamicActQuantizer,
                 weight_quantizer: WeightQuantizer | GroupWeightQuantizer) -> None:  # fmt: skip
        super().__init__()
        self.layer = layer
        self.input_quantizer = input_quantizer
        self.weight_quantizer = weight_quantizer
        self.output_quantizer: ActQuantizer | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        weight = self.weight_quantizer(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            y = self.layer._conv_forward(x, weight, self.layer.bias)
        else:
            y = F.linear(x, weight, self.layer.bias)
        return y if self.output_quantizer is None else self.output_quantizer(y)


@dataclass
class LayerPlan:
    """One row of quant_plan.json: how a layer is deployed, or why it stays in FP."""

    layer: str
    group: str
    weight_bits: int | None
    act_bits: int | None
    boundary: bool
    note: str = ""
    group_size: int | None = None  # group-wise weights and dynamic inputs (Q-DiT): input channels per group


class QuantizedDenoiser(Denoiser):
    """A Denoiser whose every call first tells the activation quantizers each sample's timestep row."""

    def __init__(self, denoiser: Denoiser, index: TimestepIndex, plan: list[LayerPlan]) -> None:
        super().__init__(denoiser.model, denoiser.family)
        self.index, self.plan, self.prompts = index, plan, denoiser.prompts

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        self.index.set_timesteps(t)
        return super().forward(x, t, cond)

    def quant_layers(self) -> dict[str, QuantLayer]:
        """Layer name (as in the diffusers model) -> its wrapper."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, QuantLayer)}

    def fp_state_dict(self) -> dict[str, torch.Tensor]:
        """The (dilated, distilled) weights under the original diffusers names, quantizers left out."""
        quantizers = tuple(f"{name}." for name, m in self.model.named_modules(remove_duplicate=False)
                           if isinstance(m, (ActQuantizer, WeightQuantizer, GroupWeightQuantizer)))  # shared ones under every name
        wrappers = {f"{name}.layer.": f"{name}." for name in self.quant_layers()}
        state = {}
        for key, value in self.model.state_dict().items():
            if key.startswith(quantizers):
                continue
            prefix = next((p for p in wrappers if key.startswith(p)), None)
            state[wrappers[prefix] + key[len(prefix):] if prefix else key] = value
        return state

    def act_quantizers(self) -> dict[str, ActQuantizer]:
        """Input group name (or '<attention>.attn_<q|k|probs|v>', '<layer>::output') -> its activation table (dynamic
        inputs have none)."""
        groups = {p.layer: p.group for p in self.plan}
        wrappers = self.quant_layers()
        layers = {groups[name]: w.input_quantizer for name, w in wrappers.items() if isinstance(w.input_quantizer, ActQuantizer)}
        outputs = {f"{name}{OUTPUT_SUFFIX}": w.output_quantizer for name, w in wrappers.items() if w.output_quantizer}
        return {**layers, **matmul_quantizers(self.model), **outputs}

    def quantize_outputs(self, layers: frozenset[str], bits: int, symmetric: bool) -> None:
        """Give these quantized layers an output quantizer (rows of this model's index)."""
        wrappers = self.quant_layers()
        for name in layers:
            rows = len(wrappers[name].input_quantizer.step)
            quantizer = ActQuantizer(self.index, rows, bits, symmetric, channel_dim=1)
            wrappers[name].output_quantizer = quantizer.to(wrappers[name].layer.weight.device)

    def set_quantization(self, activations: bool, weights: bool) -> None:
        """Switch fake quantization on or off (off: the dilated FP model, pre-scales still applied)."""
        for quantizer in [*self.act_quantizers().values(), *matmul_quantizers(self.model, tables=False).values()]:
            quantizer.enabled = activations
        for wrapper in self.quant_layers().values():
            wrapper.input_quantizer.enabled = activations
            wrapper.weight_quantizer.enabled = weights


def quantized_groups(model: nn.Module, family: Family, config: CalibConfig) -> tuple[list[InputGroup], list[LayerPlan]]:
    """The groups to quantize and the full plan (boundary layers kept in FP when configured so)."""
    groups, plan, modules = [], [], dict(model.named_modules())
    for group in input_groups(model, family.boundary_patterns):
        keep_fp = group.boundary and config.boundary == "fp"
        if not keep_fp:
            groups.append(group)
        bits = BOUNDARY_BITS if group.boundary else None
        linear = all(isinstance(modules[layer], nn.Linear) for layer in group.layers)
        group_size = config.weight_group_size if linear and not group.boundary and config.weight_group_size else None
        for layer in group.layers:
            if keep_fp:
                plan.append(LayerPlan(layer, group.name, None, None, True, "kept FP: boundary layer, --boundary fp"))
                continue
            if group_size:
                check_group_size(modules[layer].in_features, group_size, layer)
            plan.append(LayerPlan(layer, group.name, bits or config.weight_bits, bits or config.act_bits, group.boundary,
                                  group_size=group_size))  # fmt: skip
    return groups, plan


def dilate(model: nn.Module, family: Family, groups: list[InputGroup], cap: float | None) -> dict[str, DilationRecord]:
    """Apply weight dilation in place to every group; fold 1/s where exact, else leave it for a pre-scale."""
    modules, sites = dict(model.named_modules()), family.fold_sites(model)
    records = {}
    for group in groups:
        predecessor, fold = sites.get(group.name, (None, None))
        factors = dilate_group([modules[name] for name in group.layers], cap, fold)
        records[group.name] = DilationRecord(group.name, factors, predecessor)
    return records


def wrap_layers(
    denoiser: Denoiser, groups: list[InputGroup], plan: list[LayerPlan], dilation: dict[str, DilationRecord],
    index: TimestepIndex, config: CalibConfig,
) -> QuantizedDenoiser:  # fmt: skip
    """Replace every planned layer by a QuantLayer; layers of one group share one ActQuantizer."""
    bits = {p.layer: p for p in plan}
    modules = dict(denoiser.model.named_modules())
    rows = len(index) if config.tpq else 1
    if config.quantize_attention:
        quantize_attention_matmuls(denoiser.model, index, rows, config.act_bits, config.act_symmetric, config.attention_head_tables,
                                   config.softmax_quantizer)  # fmt: skip
    for group in groups:
        quantizer = input_quantizer(modules[group.layers[0]], bits[group.layers[0]], index, rows, config)
        if group.name in dilation:
            record = dilation[group.name]
            quantizer.set_dilation(record.factors, prescale=record.folded_into is None)
        for name in group.layers:
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else denoiser.model
            setattr(parent, child, QuantLayer(modules[name], quantizer, weight_quantizer(modules[name], bits[name], config)))
    # new quantizers start on the CPU: move them to where the model lives
    return QuantizedDenoiser(denoiser, index, plan).to(next(denoiser.parameters()).device)


def set_group_sizes(quantized: QuantizedDenoiser, sizes: dict[str, int], config: CalibConfig) -> None:
    """Give the layers of each input group in `sizes` that group size: fresh group-wise weight quantizers and, with
    act_dynamic, one shared dynamic input quantizer; groups already at their size are left as they are."""
    wrappers = quantized.quant_layers()
    changed = {row.group for row in quantized.plan if row.group in sizes and row.group_size != sizes[row.group]}
    for group in changed:
        rows = [row for row in quantized.plan if row.group == group]
        for row in rows:
            row.group_size = sizes[group]
            layer = wrappers[row.layer].layer
            wrappers[row.layer].weight_quantizer = weight_quantizer(layer, row, config).to(layer.weight.device)
        if config.act_dynamic:
            shared = input_quantizer(wrappers[rows[0].layer].layer, rows[0], quantized.index, 1, config)
            for row in rows:
                wrappers[row.layer].input_quantizer = shared


def input_quantizer(layer: nn.Conv2d | nn.Linear, row: LayerPlan, index: TimestepIndex, rows: int,
                    config: CalibConfig) -> ActQuantizer | DynamicActQuantizer:  # fmt: skip
    """Dynamic per token and group where the plan gives a group size and activations are dynamic, else a table of
    `rows` rows (per timestep, or one shared)."""
    if row.group_size and config.act_dynamic:
        return DynamicActQuantizer(row.act_bits, row.group_size, symmetric=config.act_symmetric)
    return ActQuantizer(index, rows, row.act_bits, config.act_symmetric, channel_dim=1 if isinstance(layer, nn.Conv2d) else -1)


def weight_quantizer(layer: nn.Conv2d | nn.Linear, row: LayerPlan, config: CalibConfig) -> WeightQuantizer | GroupWeightQuantizer:
    """Group-wise where the plan gives a group size (asymmetric, as Q-DiT and MatMulNBits allow, unless
    weight_group_symmetric), else per output channel (symmetric, as TensorRT requires)."""
    if row.group_size:
        return GroupWeightQuantizer(layer.weight, row.weight_bits, row.group_size, config.weight_group_symmetric, config.weight_init,
                                    row.layer)  # fmt: skip
    return WeightQuantizer(layer.weight, row.weight_bits, config.weight_init)


def prepare(denoiser: Denoiser, timesteps: torch.Tensor, config: CalibConfig, data: CalibrationData | None = None,
            batch_size: int = CPU_BATCH_SIZE, progress: bool = True, in_place: bool = False,
            ) -> tuple[QuantizedDenoiser, dict[str, DilationRecord], dict[str, dict]]:  # fmt: skip
    """A fake-quantized copy of `denoiser` (dilated, then reparameterised on `data`, when configured), quantizers not
    yet initialised; also the reparameterisation's statistics. `in_place`: `denoiser` itself becomes it (no second
    copy of the weights: for a caller that no longer needs the FP model)."""
    denoiser = (denoiser if in_place else copy.deepcopy(denoiser)).eval()
    family = get_family(denoiser.family)
    groups, plan = quantized_groups(denoiser.model, family, config)
    records = dilate(denoiser.model, family, groups, config.dilation_cap) if config.dilation else {}
    reparameterised = {}
    if config.reparameterise:
        if data is None:
            raise ValueError("reparameterise=True learns from calibration data: pass data")
        reparameterised = reparameterise_post_norm(denoiser, groups, records, data, config, batch_size, progress)
    for name, record in records.items():
        for row in plan:
            if row.group == name and record.folded_into:
                row.note = f"dilation folded into {record.folded_into}"
            elif row.group == name:
                row.note = "dilation as a pre-scale of the input quantizer"
    for row in plan:
        if row.group in reparameterised:
            row.note = "; ".join(filter(None, [row.note, f"post-norm reparameterisation folded into {reparameterised[row.group]['folded_into']}"]))
    quantized = wrap_layers(denoiser, groups, plan, records, TimestepIndex(timesteps), config)
    return quantized, records, reparameterised
