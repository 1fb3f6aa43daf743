"""Calibration recipes: named, versioned methods composed of parts, and named settings on top of them.

A *method* recipe (`dilatequant`, `minmax`, `eda-dm`) sets the CalibConfig fields that choose a part for each
job of a calibration run (`parts_of` reads the parts off them):

    selector        which (x_t, t) samples calibrate              calibrate/selection.py
    weight_format   how weights are quantized                    calibrate/quantizer.py, groupwise.py
    act_format      how activations are quantized                calibrate/quantizer.py, timesteps.py, groupwise.py
    softmax_format  how attention probabilities are quantized    calibrate/attention.py, log_sqrt2.py
    transforms      equivalent transforms applied first          calibrate/dilation.py, reparameterisation.py
    initialisation  how activation tables start                  calibrate/initialise.py
    search          group sizes searched (Q-DiT), or none        calibrate/search.py, group_search.py
    reconstruction  what is learned afterwards (or nothing)      calibrate/bkd.py
      loss            block output, or FBR (+ each layer's)      calibrate/reconstruction.py
      input_mixing    the student's input, or QDrop mixing       calibrate/reconstruction.py
      weight_rounding weights trained, or learned rounding       calibrate/reconstruction.py
      lr_schedule     learning rates constant, or cosine to 0    calibrate/reconstruction.py
    execution       where it runs                                calibrate/flow.py

`CalibConfig(method=...)` takes the method's settings for the fields left unset, so the API and the CLI calibrate
alike and the artifact records what ran. A *settings* recipe (`demo-quick`, the calibration report's rows, ...)
is a method plus CalibConfig fields: what a tool ran, by name, in the library rather than in the tool. Later methods add parts and recipes here; a version bump
says a recipe's meaning changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from dilatequant.core.errors import UserError

# The parts each job can be done by today; a recipe naming another is refused.
PARTS: dict[str, tuple[Any, ...]] = {
    "selector": ("random", "uniform", "tdac"),  # calibrate/selection.py
    "weight_format": ("per-channel", "group-wise"),  # group-wise: Linear layers, along input channels (Q-DiT)
    "act_format": ("per-tensor-per-timestep", "per-tensor", "dynamic"),  # dynamic: Linear inputs, per token and group
    "softmax_format": (None, "uniform", "log-sqrt2"),  # None: attention matmuls not quantized
    "transforms": ("weight-dilation", "post-norm-reparameterisation"),
    "initialisation": ("minmax", "percentile", "mse"),
    "reconstruction": (None, "block-distillation"),
    "loss": (None, "block-output", "fbr"),
    "input_mixing": (None, "none", "qdrop"),
    "weight_rounding": (None, "trained-weights", "learned-rounding"),
    "lr_schedule": (None, "constant", "cosine"),
    "search": (None, "evolutionary-group-sizes"),  # calibrate/search.py, group_search.py
    "execution": ("local",),
}
# CalibConfig fields that follow from the method: left None, they take the method recipe's setting.
METHOD_FIELDS = ("act_init", "weight_init", "bkd_iters", "tpq", "dilation", "timestep_sampling", "trajectories",
                 "recon_loss", "input_mixing", "weight_rounding", "bkd_lr_schedule", "weight_group_size", "act_dynamic", "boundary",
                 "reparameterise", "softmax_quantizer")  # fmt: skip


@dataclass(frozen=True)
class Method:
    """What a calibration is made of, one part per job (PARTS lists each job's parts); derived from settings by
    `parts_of`, never written by hand, so a recipe's parts and its settings cannot disagree."""

    selector: str
    weight_format: str
    act_format: str
    softmax_format: str | None
    transforms: tuple[str, ...]
    initialisation: str
    reconstruction: str | None
    loss: str | None
    input_mixing: str | None
    weight_rounding: str | None
    lr_schedule: str | None
    search: str | None
    execution: str

    def __post_init__(self) -> None:
        for job, allowed in PARTS.items():
            chosen = getattr(self, job)
            for part in chosen if isinstance(chosen, tuple) else (chosen,):
                if part not in allowed:
                    raise ValueError(f"{job} part {part!r} does not exist; parts: {allowed}")


def parts_of(values: Mapping[str, Any], distills: bool) -> Method:
    """The parts that calibration settings (CalibConfig fields) choose; `distills`: whether the method has a
    reconstruction at all. No transform without dilation, one activation row without TPQ, no reconstruction
    (and none of its parts) with zero iterations."""
    reconstruction = "block-distillation" if distills and values["bkd_iters"] else None
    act_format = "dynamic" if values["act_dynamic"] else "per-tensor-per-timestep" if values["tpq"] else "per-tensor"
    transforms = tuple(part for part, on in (("weight-dilation", values["dilation"]),
                                             ("post-norm-reparameterisation", values["reparameterise"])) if on)  # fmt: skip
    softmax = values["softmax_quantizer"] if values.get("quantize_attention") else None  # method settings: not quantized
    return Method(values["timestep_sampling"], "group-wise" if values["weight_group_size"] else "per-channel", act_format, softmax,
                  transforms, values["act_init"], reconstruction,
                  *(values[name] if reconstruction else None for name in ("recon_loss", "input_mixing", "weight_rounding", "bkd_lr_schedule")),
                  "evolutionary-group-sizes" if values.get("group_search") else None, "local")  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """A named, versioned way to calibrate. A method recipe (`method` is its own name) sets every field of
    METHOD_FIELDS and says whether the method distills at all; a settings recipe is a method plus fields."""

    name: str
    version: int
    description: str
    method: str  # the method recipe it builds on (itself, for a method recipe)
    settings: Mapping[str, Any] = field(default_factory=dict)  # CalibConfig fields
    distills: bool = True  # method recipes: whether there is a reconstruction to run

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))

    @property
    def parts(self) -> Method | None:
        """A method recipe's parts with its own settings (None for a settings recipe)."""
        return parts_of(self.settings, self.distills) if self.method == self.name else None

def _recipes(*recipes: Recipe) -> dict[str, Recipe]:
    return {r.name: r for r in recipes}


# Per block. 2000 with the weights' rate 1e-4 (CalibConfig.bkd_lr_weight): on the H200 at W4A4 (n = 2000) fid_digits
# 37.6 at 1000 iterations and rate 1e-5, 19.8 at rate 1e-4, 14.8 at 2000 (docs/results/low_bit_study.md). Until
# then: 400 at rate 1e-5 (the `dilatequant-v1` recipe).
DEFAULT_BKD_ITERS = 2000
# DilateQuant's and min-max's method settings: the CalibConfig defaults before methods had recipes.
DILATEQUANT = {"act_init": "mse", "weight_init": "minmax", "bkd_iters": DEFAULT_BKD_ITERS, "tpq": True, "dilation": True,
               "timestep_sampling": "random", "trajectories": 64, "recon_loss": "block-output", "input_mixing": "none",
               "weight_rounding": "trained-weights", "bkd_lr_schedule": "constant", "weight_group_size": 0,
               "act_dynamic": False, "boundary": "8bit", "reparameterise": False, "softmax_quantizer": "uniform"}  # fmt: skip
# EDA-DM as released (algorithms.md §2; CIFAR-10 DDIM scripts): one shared activation range per layer, MSE-searched
# init, TDAC over 1024 trajectories, FBR (layer weight 0.8) with QDrop (p 0.5) and learned rounding, 5000
# iterations per block at batch 32, first and last layers at 8 bits (here: the 8-bit boundary layers, which also
# hold the time embeddings). Like the released code it anneals its learning rates to 0 (cosine); the released code
# learns absolute steps, here their rate is relative to their size. Its rounding rate is 5e-2 at W8A8, 5e-1 at W4A8.
EDA_DM = {"act_init": "mse", "weight_init": "mse", "bkd_iters": 5000, "tpq": False, "dilation": False,
          "timestep_sampling": "tdac", "trajectories": 1024, "recon_loss": "fbr", "input_mixing": "qdrop",
          "weight_rounding": "learned-rounding", "bkd_lr_schedule": "cosine", "weight_group_size": 0, "act_dynamic": False,
          "boundary": "8bit", "reparameterise": False, "softmax_quantizer": "uniform"}  # fmt: skip
# Q-DiT (algorithms.md §4): no training; Linear weights in groups of 128 input channels with min/max (RTN) ranges,
# Linear inputs quantized dynamically per token and group. Like the released code it keeps the patch embedder, the
# timestep/label embedders and the final layer (the boundary layers) in FP: on digits-dit their 8-bit static scales
# cost 22 dB of paired PSNR at W8A8 (55.3 -> 33.2 dB, n = 16) and took fid_digits from 4.5 to 20 (recipe v1;
# docs/results/dit.md). Here the dynamic grids are symmetric int8 (what ONNX Runtime's MatMulNBits runs,
# export/matmul_nbits.py) unless --asymmetric; convs (none in a DiT's blocks) keep per-timestep tables. Its
# group-size search is the recipe q-dit-search (off in the method: it samples images for every candidate).
Q_DIT = {**DILATEQUANT, "act_init": "minmax", "bkd_iters": 0, "dilation": False, "weight_group_size": 128, "act_dynamic": True,
         "boundary": "fp"}  # fmt: skip
# RepQuant (algorithms.md §3): the activations after a norm are calibrated per channel (lower and upper bound per channel,
# learned against the consumers' outputs) and rewritten exactly into one per-tensor grid, folded into the norm's
# affine or DiT's adaLN modulation (calibrate/reparameterisation.py); one table for all timesteps, like RepQ-ViT; then
# block-wise reconstruction of the quantized weights. With quantize_attention, softmax outputs get log√2 levels
# (calibrate/log_sqrt2.py). RepQ-ViT keeps its first layer's input at 8 bits: so do the
# boundary layers here.
# RepQuant quantizes both attention matmuls, the softmax output on log√2 levels (export deploys it uniform)
REPQUANT = {**DILATEQUANT, "dilation": False, "tpq": False, "reparameterise": True, "quantize_attention": True,
            "softmax_quantizer": "log-sqrt2"}  # fmt: skip
RECIPES = _recipes(
    Recipe("dilatequant", 2, "DilateQuant: weight dilation, per-timestep activation tables initialised by MSE search, "
           "block-wise distillation", "dilatequant", DILATEQUANT),
    Recipe("minmax", 1, "Min/max tables (per timestep with TPQ), weight dilation, no distillation", "minmax",
           {**DILATEQUANT, "act_init": "minmax", "bkd_iters": 0}, distills=False),
    Recipe("eda-dm", 2, "EDA-DM: TDAC selection, one shared activation range, fine-grained block reconstruction with "
           "QDrop and learned rounding", "eda-dm", EDA_DM),
    Recipe("repquant", 2, "RepQuant: post-norm activations calibrated per channel with learned dual clipping and "
           "reparameterised into per-tensor scales, attention matmuls quantized (softmax on log√2 levels), one table "
           "for all timesteps, block-wise reconstruction", "repquant", REPQUANT),
    Recipe("q-dit", 2, "Q-DiT: group-wise Linear weights (groups of 128 input channels), dynamic per-token-group "
           "activations, no training, boundary layers in FP", "q-dit", Q_DIT, distills=False),
    Recipe("q-dit-search", 2, "Q-DiT with its evolutionary group-size search (mean group size >= 128 over 32-256)",
           "q-dit", {"group_search": True}),
    Recipe("q-dit-tensorrt", 2, "Q-DiT's group-wise weights in the form TensorRT runs: symmetric groups (block-quantized "
           "INT4/INT8 weights), per-tensor activation tables per timestep instead of dynamic ones", "q-dit",
           {"weight_group_symmetric": True, "act_dynamic": False}),
    Recipe("dilatequant-repquant", 1, "DilateQuant with RepQuant's post-norm reparameterisation after the dilation",
           "dilatequant", {"reparameterise": True}),
    # what the tools run, by name
    Recipe("demo-quick", 1, "The demo and CI: min/max, FP boundary layers, a 25-step grid, 512 samples", "minmax",
           {"samples": 512, "trajectories": 32, "steps": 25, "boundary": "fp"}),
    Recipe("bench", 1, "tools/bench.py's dilatequant entries: MSE tables without distillation (--bkd-iters adds it), "
           "FP boundary layers, a 25-step grid", "dilatequant",
           {"samples": 512, "trajectories": 32, "steps": 25, "boundary": "fp", "bkd_iters": 0}),
    Recipe("naive-minmax", 1, "Calibration report row: one min/max scale for all timesteps, no dilation", "minmax",
           {"tpq": False, "dilation": False}),
    Recipe("minmax-tpq", 1, "Calibration report row: per-timestep min/max tables, no dilation", "minmax",
           {"tpq": True, "dilation": False}),
    Recipe("minmax-tpq-wd", 1, "Calibration report row: per-timestep min/max tables with weight dilation", "minmax",
           {"tpq": True, "dilation": True}),
    Recipe("dilatequant-fp-boundary", 1, "DilateQuant with the boundary layers kept in FP", "dilatequant",
           {"boundary": "fp"}),
    Recipe("dilatequant-v1", 1, "DilateQuant with its defaults before the low-bit study: 400 iterations per block, "
           "weights' learning rate 1e-5", "dilatequant", {"bkd_iters": 400, "bkd_lr_weight": 1e-5}),
    Recipe("dilatequant-v1-fp-boundary", 1, "dilatequant-v1 with the boundary layers kept in FP", "dilatequant",
           {"bkd_iters": 400, "bkd_lr_weight": 1e-5, "boundary": "fp"}),
    Recipe("dilatequant-fbr-qdrop", 1, "DilateQuant with EDA-DM's reconstruction loss and input: FBR and QDrop",
           "dilatequant", {"recon_loss": "fbr", "input_mixing": "qdrop"}),
    Recipe("dilatequant-tdac", 1, "DilateQuant calibrated on EDA-DM's TDAC selection (each of the 1024 samples from "
           "its own trajectory)", "dilatequant", {"timestep_sampling": "tdac", "trajectories": 1024}),
)  # fmt: skip
METHODS = tuple(name for name, r in RECIPES.items() if r.method == name)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"Unknown calibration recipe '{name}'; recipes: {', '.join(RECIPES)}.")
    return RECIPES[name]


def method_parts(method: str) -> Method:
    parts = get_recipe(method).parts
    if parts is None:
        raise UserError(f"'{method}' is a settings recipe, not a method; methods: {', '.join(METHODS)}.")
    return parts


def parts_that_ran(config) -> Method:
    """The parts a resolved CalibConfig runs."""
    return parts_of(asdict(config), get_recipe(config.method).distills)


def recorded_recipe(config) -> dict:
    """What an artifact records: the recipe its settings came from (name, version) and the parts that ran."""
    chosen = get_recipe(config.recipe or config.method)
    parts = {job: list(v) if isinstance(v, tuple) else v for job, v in asdict(parts_that_ran(config)).items()}
    return {"name": chosen.name, "version": chosen.version, "method": config.method, "parts": parts}


def recipe(name: str, bits: str = "W8A8", **overrides):
    """The CalibConfig of recipe `name` at `bits` ('W8A8', 'W4A8', ...), with `overrides` on top."""
    from .config import CalibConfig

    chosen = get_recipe(name)
    return CalibConfig.from_bits(bits, **{"method": chosen.method, **chosen.settings, **overrides, "recipe": name})
