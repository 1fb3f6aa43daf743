"""RepQuant's post-norm reparameterisation: a per-channel activation quantizer rewritten exactly into a per-tensor one.

The activation X that follows a norm has channel-wise ranges (LayerNorm's γ and β, adaLN's shift and scale) that one
per-tensor grid fits badly. Calibrate a per-channel asymmetric quantizer (Δ_c, z_c), whose lower and upper clipping
bounds are learned per channel (RepQuant's dual clipping), then with Δ̃ = mean Δ_c and z̃ = round(mean z_c):

    r_c = Δ_c / Δ̃,   b_c = Δ̃ (z̃ − z_c),   X'_c = X_c / r_c − b_c

On the per-tensor grid (Δ̃, z̃), X' has the codes X has on the per-channel grid: round(X'_c / Δ̃) + z̃ =
round(X_c / Δ_c) + z_c, because z̃ − z_c is an integer. The predecessor (norm affine, adaLN modulation rows) absorbs
1/r and −b; each consumer Linear absorbs r into its input columns and W·(r ⊙ b) into its bias, so the FP function
is unchanged (RepQ-ViT's derivation, algorithms.md §3.1). A consumer without a bias cannot absorb an offset: there the
per-channel quantizer shares one zero point (b = 0) and only the steps differ per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dilatequant.core.denoiser import Denoiser
from dilatequant.core.errors import UserError
from dilatequant.core.structure import Fold, InputGroup, post_norm_sites

from .calib_data import CalibrationData, run_over
from .config import CalibConfig
from .dilation import DilationRecord, input_channel_view
from .quantizer import MIN_STEP, IntFormat, round_ste

# Rows (tokens or pixels) of each post-norm input kept to learn its clipping: a random share of every calibration
# batch. 16,384 rows of 256 channels are 16 MB per input.
ROWS_PER_INPUT = 16384


class ChannelClipQuantizer(nn.Module):
    """Per-channel asymmetric fake quantizer of x[..., C] whose grid spans learnable bounds [lo_c, hi_c] per channel
    (the zero point z_c = −lo_c / Δ_c need not be an integer: the reparameterisation makes it one). With
    `shared_zero` every channel has the same integer zero point, so the grid holds 0 and there are no offsets."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, bits: int, shared_zero: bool = False) -> None:
        super().__init__()
        self.fmt, self.shared_zero = IntFormat(bits, symmetric=False), shared_zero
        lo, hi = (lo.clamp(max=0), hi.clamp(min=0)) if shared_zero else (lo, hi)
        self.register_buffer("lo_init", lo.detach().clone())
        self.register_buffer("span", (hi - lo).detach().clamp_min(MIN_STEP))
        # the bounds move in units of each channel's initial range, so one learning rate suits every channel
        self.lo_shift, self.hi_shift = nn.Parameter(torch.zeros_like(lo)), nn.Parameter(torch.zeros_like(hi))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = self.lo_init + self.span * self.lo_shift
        return lo, lo + self.span * (1 + self.hi_shift - self.lo_shift)

    def step_and_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.bounds()
        step = ((hi - lo) / self.fmt.qmax).clamp_min(MIN_STEP)
        zero = -lo / step
        if self.shared_zero:
            zero = round_ste(zero.mean()).clamp(0, self.fmt.qmax).expand_as(zero)
        return step, zero

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        step, zero = self.step_and_zero()
        return torch.clamp(torch.round(x / step + zero), 0, self.fmt.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step, zero = self.step_and_zero()
        return (torch.clamp(round_ste(x / step + zero), 0, self.fmt.qmax) - zero) * step


@dataclass
class Reparameterisation:
    """X'_c = X_c / scale_c − offset_c, quantized per tensor by (step, zero_point)."""

    scale: torch.Tensor
    offset: torch.Tensor
    step: torch.Tensor
    zero_point: torch.Tensor

    @classmethod
    def of(cls, quantizer: ChannelClipQuantizer) -> Reparameterisation:
        with torch.no_grad():
            step, zero = quantizer.step_and_zero()
            shared_step, shared_zero = step.mean(), zero.mean().round().clamp(0, quantizer.fmt.qmax)
            return cls(step / shared_step, shared_step * (shared_zero - zero), shared_step, shared_zero)

    def codes(self, x: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
        """The per-tensor codes of x (the activation before the rewrite)."""
        return torch.clamp(torch.round((x / self.scale - self.offset) / self.step) + self.zero_point, fmt.qmin, fmt.qmax)


def fold(predecessor: Fold, consumers: list[nn.Linear | nn.Conv2d], rep: Reparameterisation) -> None:
    """Rewrite predecessor and consumers so the consumers' input becomes X' and their output is unchanged (a Conv2d
    consumer, a Transformer2DModel's 1x1 proj_in, takes offsets only at kernel size 1, where no padding reads them)."""
    offset = rep.offset if rep.offset.any() else None
    if offset is not None and any(layer.bias is None for layer in consumers):
        raise ValueError("a consumer without a bias cannot absorb the offsets: calibrate with shared_zero")
    if offset is not None and any(layer.weight[0, 0].numel() != 1 for layer in consumers):
        raise ValueError("a consumer with a spatial kernel cannot absorb the offsets exactly (padding): calibrate with shared_zero")
    with torch.no_grad():
        for layer in consumers:
            if offset is not None:
                layer.bias.add_(layer.weight.flatten(1) @ (rep.scale * rep.offset).to(layer.weight.dtype))
            layer.weight.mul_(input_channel_view(layer.weight, rep.scale.to(layer.weight.dtype)))
        predecessor(rep.scale, offset)


def learn_clipping(x: torch.Tensor, consumers: list[nn.Linear | nn.Conv2d], bits: int, shared_zero: bool, iters: int = 200,
                   lr: float = 1e-2) -> ChannelClipQuantizer:  # fmt: skip
    """The dual clipping bounds of x[N, C] (the consumers' input), from the per-channel min/max, trained so the
    consumers' outputs on the fake-quantized x match those on x (mean squared error, Adam), on the consumers' device."""
    weights = [layer.weight.detach().flatten(1).float() for layer in consumers]  # a 1x1 Conv2d as a Linear
    x = x.to(weights[0].device)
    quantizer = ChannelClipQuantizer(x.amin(0), x.amax(0), bits, shared_zero).to(x.device)
    targets = [F.linear(x, w) for w in weights]
    optimiser = torch.optim.Adam(quantizer.parameters(), lr=lr)
    for _ in range(iters):
        quantized = quantizer(x)
        loss = sum(F.mse_loss(F.linear(quantized, w), target) for w, target in zip(weights, targets))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return quantizer


def reparameterise_post_norm(denoiser: Denoiser, groups: list[InputGroup], dilation: dict[str, DilationRecord],
                             data: CalibrationData, config: CalibConfig, batch_size: int, progress: bool = True) -> dict[str, dict]:  # fmt: skip
    """Learn each quantized post-norm input's per-channel clipping on the calibration data and fold its per-tensor
    rewrite into the model (after dilation: a dilation left as a pre-scale is folded into the same predecessor
    first). Returns per-group statistics; refuses a model with a quantized post-norm input that cannot fold."""
    sites, refused = post_norm_sites(denoiser.model)
    planned = {group.name: group for group in groups}
    refused = {group: why for group, why in refused.items() if group in planned}
    if refused:
        raise UserError("RepQuant's post-norm reparameterisation cannot rewrite " + "; ".join(f"{g} ({why})" for g, why in refused.items())
                        + ". Calibrate with --no-reparameterise, or keep those layers out of quantization.")  # fmt: skip
    targets = {group: site for group, site in sites.items() if group in planned}
    modules = dict(denoiser.model.named_modules())
    for group, (name, predecessor) in targets.items():
        record = dilation.get(group)
        if record is not None and record.folded_into is None:
            predecessor(record.factors)
            record.folded_into = name
    inputs = consumer_inputs(denoiser, {group: modules[planned[group].layers[0]] for group in targets}, data, batch_size, config.seed,
                             progress)  # fmt: skip
    statistics = {}
    for group, (name, predecessor) in tqdm(targets.items(), desc="learn post-norm clipping", disable=not progress):
        consumers = [modules[layer] for layer in planned[group].layers]
        shared_zero = any(layer.bias is None or layer.weight[0, 0].numel() != 1 for layer in consumers)
        quantizer = learn_clipping(inputs.pop(group), consumers, config.act_bits, shared_zero, config.reparam_iters)
        rep = Reparameterisation.of(quantizer)
        fold(predecessor, consumers, rep)
        statistics[group] = {"folded_into": name, "offsets": not shared_zero, "scale_min": float(rep.scale.min()),
                             "scale_max": float(rep.scale.max()), "per_tensor_step": float(rep.step)}  # fmt: skip
    return statistics


def consumer_inputs(denoiser: Denoiser, consumers: dict[str, nn.Module], data: CalibrationData, batch_size: int,
                    seed: int, progress: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """A random sample of ROWS_PER_INPUT rows (channels last) of each consumer's input over the calibration data."""
    generator, batches = torch.Generator().manual_seed(seed), -(-len(data) // batch_size)
    kept: dict[str, list[torch.Tensor]] = {group: [] for group in consumers}

    def keep(group: str, x: torch.Tensor) -> None:
        rows = (x.movedim(1, -1) if x.dim() == 4 else x).reshape(-1, x.shape[1 if x.dim() == 4 else -1])
        chosen = torch.randperm(len(rows), generator=generator)[: -(-ROWS_PER_INPUT // batches)]
        kept[group].append(rows[chosen.to(rows.device)].float().cpu())

    handles = [layer.register_forward_pre_hook(lambda module, args, group=group: keep(group, args[0])) for group, layer in consumers.items()]
    try:
        run_over(denoiser, data, batch_size, next(denoiser.parameters()).device, "observe post-norm inputs", progress)
    finally:
        for handle in handles:
            handle.remove()
    return {group: torch.cat(rows) for group, rows in kept.items()}
