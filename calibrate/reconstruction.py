"""The parts of block reconstruction (calibrate/bkd.py) a recipe chooses between.

    loss             block-output: MSE of the block's output against the FP block's
                     fbr: EDA-DM's fine-grained block reconstruction, + fbr_lambda x the MSE of every quantized
                     layer's output inside the block but the last (targets: the FP block on the FP input)
    input_mixing     none: the student reads the quantized path's block input
                     qdrop: each element of the block input comes from the FP path with probability qdrop_prob
    weight_rounding  trained-weights: the weights themselves are trained (DilateQuant)
                     learned-rounding: AdaRound's soft rounding of each weight between the floor and the ceiling
                     of its grid position, hardened at the end; weights and their steps stay fixed
    lr_schedule      constant, or cosine: every learning rate annealed to 0 over the iterations (EDA-DM's code)

(algorithms.md §2.2.) Each is plain code here; bkd.py composes them as the config says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import CalibConfig
from .quant_model import QuantLayer
from .quantizer import WeightQuantizer


def block_output_loss(output: torch.Tensor, target: torch.Tensor, layer_outputs: list[torch.Tensor],
                      layer_targets: list[torch.Tensor], layer_weight: float) -> torch.Tensor:  # fmt: skip
    """MSE of the block's output (the layers' outputs are not used)."""
    return F.mse_loss(output, target)


def fbr_loss(output: torch.Tensor, target: torch.Tensor, layer_outputs: list[torch.Tensor], layer_targets: list[torch.Tensor],
             layer_weight: float) -> torch.Tensor:  # fmt: skip
    """Block-output MSE + layer_weight x the sum of the layers' output MSEs."""
    return F.mse_loss(output, target) + layer_weight * sum(F.mse_loss(o, t) for o, t in zip(layer_outputs, layer_targets))


def qdrop_mix(quantized, fp, prob: float, generator: torch.Generator | None):
    """The block input with each element of every floating tensor taken from `fp` with probability `prob`
    (else from `quantized`); other values (and tensors whose shapes differ) come from `quantized`."""
    if isinstance(quantized, torch.Tensor):
        if not quantized.is_floating_point() or not isinstance(fp, torch.Tensor) or fp.shape != quantized.shape:
            return quantized
        take_fp = torch.rand(quantized.shape, generator=generator, device=quantized.device) < prob
        return torch.where(take_fp, fp, quantized)
    if isinstance(quantized, (tuple, list)):
        return type(quantized)(qdrop_mix(q, f, prob, generator) for q, f in zip(quantized, fp))
    if isinstance(quantized, dict):
        return {k: qdrop_mix(v, fp.get(k), prob, generator) for k, v in quantized.items()}
    return quantized


def quant_layer_names(block: nn.Module) -> list[str]:
    """The quantized layers of a block, by name relative to the block, in module order."""
    return [name for name, module in block.named_modules() if isinstance(module, QuantLayer)]


@contextmanager
def layer_outputs(block: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the outputs of the named submodules of `block` during the calls made inside the context."""
    modules, outputs = dict(block.named_modules()), {}
    handles = [modules[name].register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out)) for name in names]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


class LearnedRounding(nn.Module):
    """Stands in for a layer's WeightQuantizer while its block is reconstructed: the weight is
    step x clamp(floor(w / step) + h(alpha), qmin, qmax) with h the rectified sigmoid (zeta 1.1, gamma -0.1),
    alpha initialised so that h(alpha) is the weight's fractional grid position (AdaRound)."""

    ZETA, GAMMA = 1.1, -0.1

    def __init__(self, weight: torch.Tensor, quantizer: WeightQuantizer) -> None:
        super().__init__()
        self.fmt = quantizer.fmt
        self.register_buffer("step", quantizer.step.detach().clamp_min(1e-8).view(-1, *[1] * (weight.dim() - 1)).clone())
        scaled = weight.detach() / self.step
        self.register_buffer("floor", scaled.floor())
        fraction = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((self.ZETA - self.GAMMA) / (fraction - self.GAMMA) - 1))

    def soft(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (self.ZETA - self.GAMMA) + self.GAMMA, 0, 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.step * torch.clamp(self.floor + self.soft(), self.fmt.qmin, self.fmt.qmax)

    def hardened(self) -> torch.Tensor:
        """Each weight on the floor or the ceiling of its grid position: the side its alpha chose."""
        return self.step * torch.clamp(self.floor + (self.alpha >= 0).to(self.floor.dtype), self.fmt.qmin, self.fmt.qmax)


class TrainedWeights:
    """The weights themselves train (lr `bkd_lr_weight`), with every quantizer step of the block."""

    def __init__(self, block: nn.Module, config: CalibConfig) -> None:
        self.weights = [m.layer.weight for m in block.modules() if isinstance(m, QuantLayer)]
        self.lr = config.bkd_lr_weight

    def param_groups(self) -> list[dict]:
        return [{"params": self.weights, "lr": self.lr}]

    def trains_weight_steps(self) -> bool:
        return True

    def finish(self) -> None:
        """Nothing to harden."""


class RoundingWeights:
    """Learned rounding (lr `bkd_lr_rounding`): each quantized layer's WeightQuantizer is swapped for a
    LearnedRounding while the block trains, then the layer's weight is set to the hardened grid value and the
    quantizer is put back (which then reproduces exactly that value). Weight steps stay fixed."""

    def __init__(self, block: nn.Module, config: CalibConfig) -> None:
        self.layers = [m for m in block.modules() if isinstance(m, QuantLayer)]
        self.originals = [layer.weight_quantizer for layer in self.layers]
        self.roundings = [LearnedRounding(layer.layer.weight, layer.weight_quantizer) for layer in self.layers]
        for layer, rounding in zip(self.layers, self.roundings):
            layer.weight_quantizer = rounding
        self.lr = config.bkd_lr_rounding

    def param_groups(self) -> list[dict]:
        return [{"params": [r.alpha for r in self.roundings], "lr": self.lr}]

    def trains_weight_steps(self) -> bool:
        return False

    def finish(self) -> None:
        with torch.no_grad():
            for layer, rounding, original in zip(self.layers, self.roundings, self.originals):
                layer.layer.weight.copy_(rounding.hardened().to(layer.layer.weight.dtype))
                layer.weight_quantizer = original


def cosine(iteration: int, total: int) -> float:
    """The learning rate's fraction of its base at `iteration` of `total`: from 1 down to 0 along a half cosine."""
    return 0.5 * (1 + math.cos(math.pi * iteration / total))


# part name -> implementation (recipes.PARTS names them)
LOSSES = {"block-output": block_output_loss, "fbr": fbr_loss}
LAYER_TARGETS = frozenset({"fbr"})  # losses that need the FP block's layer outputs
MIXERS: dict[str, Callable | None] = {"none": None, "qdrop": qdrop_mix}  # None: the quantized path's input as it is
FP_INPUTS = frozenset(name for name, mixer in MIXERS.items() if mixer)  # mixings that read the FP block's input
WEIGHT_ROUNDINGS = {"trained-weights": TrainedWeights, "learned-rounding": RoundingWeights}
LR_SCHEDULES: dict[str, Callable[[int, int], float] | None] = {"constant": None, "cosine": cosine}  # None: rates never change
