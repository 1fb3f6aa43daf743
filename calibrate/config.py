"""The one typed configuration of a calibration run; the CLI builds it, the artifact records it."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from dilatequant.core.errors import UserError
from dilatequant.core.manifest import recorded_config
from dilatequant.core.sampling import GUIDANCE_SCALE, SCHEDULERS

from .recipes import METHOD_FIELDS, METHODS, PARTS, RECIPES, get_recipe

BIT_PRESETS = ("W8A8", "W6A6", "W4A8", "W4A4")
OFFLOAD_CHOICES = ("auto", "on", "off")  # distillation block offloading (calibrate/offload.py)
ACT_INITS = PARTS["initialisation"]
WEIGHT_INITS = ("minmax", "mse")
RECON_LOSSES = tuple(p for p in PARTS["loss"] if p)
INPUT_MIXING = tuple(p for p in PARTS["input_mixing"] if p)
WEIGHT_ROUNDING = tuple(p for p in PARTS["weight_rounding"] if p)
LR_SCHEDULES = tuple(p for p in PARTS["lr_schedule"] if p)
TIMESTEP_SAMPLING = PARTS["selector"]
BOUNDARY = ("8bit", "fp")
SOFTMAX_QUANTIZERS = tuple(p for p in PARTS["softmax_format"] if p)
SUPPORTED_BITS = (4, 6, 8)


@dataclass(frozen=True)
class CalibConfig:
    """How to calibrate. `method` names a method recipe (calibrate/recipes.py): 'dilatequant' initialises by MSE
    search and distills block-wise (2000 iterations per block), 'minmax' initialises from min/max and does not
    distill, 'eda-dm' is EDA-DM as released. Fields left None (recipes.METHOD_FIELDS) take the method's setting;
    the resolved config is what runs and what the artifact records. `recipe` names the recipe the settings came
    from (the method itself unless `recipe()` built it)."""

    weight_bits: int = 8
    act_bits: int = 8
    method: str = "dilatequant"
    recipe: str | None = None
    dilation: bool | None = None  # the method's: True (dilatequant, minmax), False (eda-dm)
    dilation_cap: float | None = 100.0
    tpq: bool | None = None  # per-timestep activation tables; the method's: True, False (eda-dm)
    act_symmetric: bool = True
    boundary: str | None = None  # the method's: 8bit (dilatequant, minmax, eda-dm), fp (q-dit)
    # RepQuant's post-norm reparameterisation (calibrate/reparameterisation.py); the method's: True (repquant)
    reparameterise: bool | None = None
    reparam_iters: int = 200  # Adam iterations learning each post-norm input's per-channel clipping bounds
    quantize_attention: bool = False  # also the inputs of q·kᵀ and attn·v (softmax output included)
    attention_head_tables: bool = False  # with quantize_attention: one table entry per (timestep, head)
    # with quantize_attention: the softmax output's grid, uniform or log√2 (calibrate/log_sqrt2.py); the method's:
    # uniform, log-sqrt2 (repquant)
    softmax_quantizer: str | None = None
    weight_group_size: int | None = None  # the method's: 0 = per output channel, else Linear weights in groups of input channels (q-dit: 128)
    act_dynamic: bool | None = None  # the method's: Linear inputs quantized per token and group at run time (q-dit)
    # group grids symmetric (zero point 0: TensorRT's block-quantized INT4) instead of asymmetric (MatMulNBits)
    weight_group_symmetric: bool = False
    # Q-DiT's group-size search (calibrate/group_search.py): one group size per Linear input group from
    # group_choices, their mean at least weight_group_size, fitness from search_images sampled images
    group_search: bool = False
    group_choices: tuple[int, ...] = (32, 64, 128, 256)  # block sizes ONNX Runtime's MatMulNBits runs
    search_population: int = 20
    search_top_k: int = 5
    search_generations: int = 5
    search_images: int = 64
    weight_init: str | None = None  # the method's: minmax, mse (eda-dm)
    act_init: str | None = None  # the method's: mse (dilatequant, eda-dm), minmax (minmax)
    percentile: float = 99.99
    # calibration data: FP trajectories, then `samples` (x_t, t) pairs drawn from them
    samples: int = 1024
    trajectories: int | None = None  # the method's: 64, 1024 (eda-dm: one per sample)
    timestep_sampling: str | None = None  # the data selector (calibrate/selection.py): random, uniform or tdac
    tdac_radius: float = 3.0  # TDAC: MSE radius of the density count (EDA-DM's DDIM CIFAR-10 setting)
    tdac_lambda: float = 1.2  # TDAC: weight of diversity against density (EDA-DM's CIFAR-10 and ImageNet setting)
    scheduler: str = "ddim"
    steps: int = 50
    seed: int = 0
    # text-to-image pipelines: trajectories follow these prompts (cycled) with classifier-free guidance against the
    # negative prompt, recording both halves; none: class ids (or a cross-attention model's seeded stand-in states)
    prompts: tuple[str, ...] = ()
    negative_prompt: str = ""
    guidance_scale: float = GUIDANCE_SCALE
    # block-wise knowledge distillation
    bkd_iters: int | None = None  # the method's: 2000 per block (dilatequant), 0 (minmax), 5000 (eda-dm)
    bkd_batch: int = 32
    bkd_lr_weight: float = 1e-4  # 1e-5 before the low-bit study (recipe dilatequant-v1)
    bkd_lr_step: float = 1e-3  # relative to each step tensor's mean magnitude
    bkd_cuda_graph: bool = True  # on a GPU, replay each block's training step as a CUDA graph (same arithmetic)
    bkd_offload: str = "auto"  # on: blocks in host memory, one on the device at a time (calibrate/offload.py); auto: when the GPU needs it
    # reconstruction parts (calibrate/reconstruction.py); the method's: block-output, none, trained-weights
    recon_loss: str | None = None  # block-output, or fbr: + fbr_lambda x each quantized layer's output MSE
    fbr_lambda: float = 0.8
    input_mixing: str | None = None  # none, or qdrop: each input element from the FP path with qdrop_prob
    qdrop_prob: float = 0.5
    weight_rounding: str | None = None  # trained-weights (lr bkd_lr_weight), or learned-rounding (lr bkd_lr_rounding)
    bkd_lr_rounding: float = 5e-2
    bkd_lr_schedule: str | None = None  # constant, or cosine (annealed to 0 over bkd_iters); the method's

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"Calibration option method='{self.method}' is not one of: {', '.join(METHODS)}.")
        self._resolve_method_settings()
        object.__setattr__(self, "group_choices", tuple(self.group_choices))  # a JSON record holds a list
        object.__setattr__(self, "prompts", tuple(self.prompts))
        for name, value, allowed in (
            ("act_init", self.act_init, ACT_INITS), ("recipe", self.recipe, tuple(RECIPES)), ("softmax_quantizer", self.softmax_quantizer, SOFTMAX_QUANTIZERS),
            ("weight_init", self.weight_init, WEIGHT_INITS), ("boundary", self.boundary, BOUNDARY),
            ("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING), ("scheduler", self.scheduler, SCHEDULERS),
            ("recon_loss", self.recon_loss, RECON_LOSSES), ("input_mixing", self.input_mixing, INPUT_MIXING),
            ("weight_rounding", self.weight_rounding, WEIGHT_ROUNDING), ("bkd_lr_schedule", self.bkd_lr_schedule, LR_SCHEDULES),
            ("bkd_offload", self.bkd_offload, OFFLOAD_CHOICES),
        ):  # fmt: skip
            if value not in allowed:
                raise UserError(f"Calibration option {name}='{value}' is not one of: {', '.join(allowed)}.")
        for name, bits in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if bits not in SUPPORTED_BITS:
                raise UserError(f"{name}={bits} is unsupported; use one of {', '.join(map(str, SUPPORTED_BITS))}.")
        if self.samples < 1 or self.trajectories < 1 or self.steps < 1 or self.bkd_iters < 0:
            raise UserError("samples, trajectories and steps must be >= 1 and bkd_iters >= 0.")
        if self.timestep_sampling == "tdac" and self.samples > self.trajectories * self.halves:
            raise UserError(f"timestep_sampling='tdac' takes every sample from its own trajectory: samples={self.samples} "
                            f"needs trajectories >= {-(-self.samples // self.halves)} (got {self.trajectories}).")  # fmt: skip
        if not (0 <= self.qdrop_prob <= 1 and self.fbr_lambda >= 0):
            raise UserError(f"qdrop_prob must be in [0, 1] and fbr_lambda >= 0; got {self.qdrop_prob}, {self.fbr_lambda}.")
        rates = {"bkd_lr_weight": self.bkd_lr_weight, "bkd_lr_step": self.bkd_lr_step, "bkd_lr_rounding": self.bkd_lr_rounding}
        if self.bkd_batch < 1 or min(rates.values()) <= 0:
            raise UserError(f"bkd_batch must be >= 1 and learning rates > 0; got bkd_batch={self.bkd_batch}, "
                            + ", ".join(f"{k}={v}" for k, v in rates.items()) + ".")
        if self.attention_head_tables and not self.quantize_attention:
            raise UserError("attention_head_tables=True would not run: it gives the attention matmul inputs one table "
                            "entry per head, and those are quantized only with quantize_attention=True.")
        if self.weight_group_size < 0:
            raise UserError(f"weight_group_size must be 0 (per output channel) or a group size, got {self.weight_group_size}.")
        if self.weight_group_size and self.weight_rounding == "learned-rounding" and self.bkd_iters:
            raise UserError("weight_rounding='learned-rounding' learns per-channel rounding; with weight_group_size="
                            f"{self.weight_group_size} use weight_rounding='trained-weights'.")  # fmt: skip
        if self.group_search and not self.weight_group_size:
            raise UserError("group_search=True searches group sizes whose mean is at least weight_group_size; give "
                            "weight_group_size (e.g. 128), the budget.")  # fmt: skip
        if self.group_search and min(self.search_population, self.search_top_k, self.search_generations, self.search_images) < 1:
            raise UserError("search_population, search_top_k, search_generations and search_images must be >= 1.")
        if self.group_search and (self.search_top_k > self.search_population or self.search_population < 2):
            raise UserError(f"search_top_k={self.search_top_k} parents must come from search_population={self.search_population} "
                            "(at least 2) candidates; raise the population or lower top_k.")  # fmt: skip
        if self.weight_group_symmetric and not self.weight_group_size:
            raise UserError("weight_group_symmetric=True sets the grid of group-wise weights, and weight_group_size=0 has "
                            "no groups; give weight_group_size (e.g. 128).")  # fmt: skip
        if self.act_dynamic and not self.weight_group_size:
            raise UserError("act_dynamic=True quantizes each Linear input per token and weight group, and "
                            "weight_group_size=0 has no groups; give weight_group_size (e.g. 128) or act_dynamic=False.")  # fmt: skip
        if self.act_dynamic and self.dilation:
            raise UserError("act_dynamic=True with dilation=True: dilation moves range between a static table's input "
                            "channels, a dynamic grid already adapts to every token; turn one of them off.")  # fmt: skip
        if self.reparameterise and self.act_dynamic:
            raise UserError("reparameterise=True rewrites post-norm inputs for one static per-tensor grid; act_dynamic=True "
                            "computes their grids at run time. Turn one of them off.")  # fmt: skip
        if self.reparam_iters < 0:
            raise UserError(f"reparam_iters must be >= 0, got {self.reparam_iters}.")
        if self.guidance_scale < 1:
            raise UserError(f"guidance_scale must be >= 1 (1: no classifier-free guidance), got {self.guidance_scale}.")
        if not (self.tdac_radius > 0 and self.tdac_lambda >= 0):
            raise UserError(f"tdac_radius must be > 0 and tdac_lambda >= 0, got {self.tdac_radius}, {self.tdac_lambda}.")
        if self.samples > self.trajectories * self.steps * self.halves:
            raise UserError(f"samples={self.samples} exceeds the {self.trajectories} trajectories x {self.steps} steps"
                            f"{' x 2 guided halves' if self.halves == 2 else ''} recorded; raise trajectories or lower samples.")  # fmt: skip

    def _resolve_method_settings(self) -> None:
        """Fill the fields left None from the method, and refuse settings the method would not run: a config
        must say what runs (frozen: set once here, as dataclass defaults cannot depend on `method`)."""
        method = get_recipe(self.method)
        if self.recipe is None:
            object.__setattr__(self, "recipe", self.method)
        for name in METHOD_FIELDS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, method.settings[name])
        if not method.distills and self.act_init != method.settings["act_init"]:
            raise UserError(f"method='{self.method}' initialises activations from {method.settings['act_init']}; act_init="
                            f"'{self.act_init}' would not run. Leave act_init unset (None), or use method='dilatequant'.")  # fmt: skip
        if not method.distills and self.bkd_iters:
            raise UserError(f"method='{self.method}' does not distill; bkd_iters={self.bkd_iters} would not run. "
                            "Leave bkd_iters unset (None), or use method='dilatequant'.")  # fmt: skip
        unused = [f"{name}='{getattr(self, name)}'" for name in ("recon_loss", "input_mixing", "weight_rounding", "bkd_lr_schedule")
                  if not self.bkd_iters and getattr(self, name) != method.settings[name]]  # fmt: skip
        if unused:
            raise UserError(f"{', '.join(unused)} would not run: there is no reconstruction (bkd_iters=0). Set "
                            "bkd_iters, or leave them unset.")  # fmt: skip

    @classmethod
    def from_bits(cls, preset: str, **overrides) -> CalibConfig:
        """CalibConfig for 'W8A8', 'W4A8', ... plus overrides."""
        match = re.fullmatch(r"W(\d)A(\d)", preset.upper())
        if match is None:
            raise UserError(f"Bit preset '{preset}' is not of the form WxAy; use one of {', '.join(BIT_PRESETS)}.")
        return cls(weight_bits=int(match[1]), act_bits=int(match[2]), **overrides)

    @property
    def halves(self) -> int:
        """Denoiser inputs recorded per trajectory and step: 2 under classifier-free guidance (prompt and negative)."""
        return 2 if self.prompts and self.guidance_scale != 1 else 1

    @property
    def bits_name(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, format_version: str = "1.0") -> CalibConfig:
        """The config recorded in a calibration artifact of `format_version` (unknown keys are an error)."""
        values = dict(values)
        if values.get("method") == "minmax" and values.get("act_init") not in (None, "minmax"):
            values["act_init"] = "minmax"  # format 1.0 records before recipes kept an act_init that minmax ignored
        return recorded_config(cls, values, "calibration", format_version)
