"""Block-wise Knowledge Distillation (BKD), the block reconstruction every recipe that learns shares.

For each block in call order: the target is the FP block's output on the FP path; the student is the
quantized block fed by the output of the already-distilled quantized blocks before it. Adam trains the
block's weights (lr `bkd_lr_weight`) or their rounding (`bkd_lr_rounding`), and its steps and per-timestep
activation tables (lr `bkd_lr_step`). Inputs and targets are cached per block and detached, so backward
paths end at the block: memory scales with the largest block, not the model. The loss, the student's input
and how weights move are parts (calibrate/reconstruction.py); DilateQuant's are the block-output MSE, the
quantized path's input and the weights themselves.

Why DilateQuant trains the weights rather than a rounding (AdaRound-style) offset: dilation already put the
weights where their per-channel grids fit; a small learning rate refines them jointly with their steps at no
extra state, while a rounding parametrisation doubles the parameters.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dilatequant.core.denoiser import Denoiser
from dilatequant.core.errors import UserError
from dilatequant.core.families import get_family
from dilatequant.core.structure import call_order
from dilatequant.core.tensors import map_tensors

from .calib_data import CalibrationData
from .config import CalibConfig
from .cuda_graph import WARMUP, GraphedStep, replayable
from .distributed import SINGLE, Ranks
from .offload import offloaded
from .quant_model import QuantizedDenoiser, QuantLayer
from .quantizer import ActQuantizer, WeightQuantizer
from .reconstruction import FP_INPUTS, LAYER_TARGETS, LOSSES, LR_SCHEDULES, MIXERS, WEIGHT_ROUNDINGS, layer_outputs, quant_layer_names
from .workdir import WorkDir


class _StopForward(Exception):
    """Raised by a hook once what it needed is captured: the rest of the forward pass is skipped."""


def detached(value):
    return map_tensors(torch.Tensor.detach, value)


def first_tensor(output) -> torch.Tensor:
    """The hidden states of a block's output (tensor, tuple or diffusers output object)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    return output.sample


@contextmanager
def capture(module: nn.Module, what: str) -> Iterator[dict]:
    """Capture the module's call ('inputs': args and kwargs) or its 'output', then stop the forward pass."""
    box: dict = {}

    def before(_, args, kwargs):
        box["args"], box["kwargs"] = detached(args), detached(kwargs)
        raise _StopForward

    def after(_, args, output):
        box["output"] = first_tensor(output).detach()
        raise _StopForward

    # prepended: the forward stops before an offloaded block is copied to the device for nothing
    handle = (module.register_forward_pre_hook(before, with_kwargs=True, prepend=True) if what == "inputs"
              else module.register_forward_hook(after))  # fmt: skip
    try:
        yield box
    finally:
        handle.remove()


@dataclass
class Batch:
    x: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor | None
    share: float = 1.0  # this rank's rows over the whole batch's: the weight of its loss


def batches(data: CalibrationData, denoiser: Denoiser, size: int, device: torch.device, ranks: Ranks = SINGLE) -> list[Batch]:
    """Fixed mixed-timestep batches of the calibration data, on the device; on several ranks, this rank's rows of each."""
    out = []
    for start in range(0, len(data), size):
        n = min(size, len(data) - start)
        if n < ranks.world_size:
            raise UserError(f"a distillation batch of {n} samples cannot be split over {ranks.world_size} ranks; make "
                            "--samples and --bkd-batch multiples of at least that many, or use fewer ranks.")  # fmt: skip
        rows = ranks.rows(n)
        rows = slice(start + rows.start, start + rows.stop)
        cond = denoiser.conditioning(data.labels[rows])
        out.append(Batch(data.x[rows].to(device), data.t[rows].to(device), cond.to(device) if cond is not None else None,
                         (rows.stop - rows.start) / n))  # fmt: skip
    return out


@torch.no_grad()
def run_captured(model: Denoiser, module: nn.Module, what: str, batch: Batch):
    with capture(module, what) as box:
        try:
            model(batch.x, batch.t, batch.cond)
        except _StopForward:
            pass
    return box


def has_quantized_layers(block: nn.Module) -> bool:
    return any(isinstance(m, QuantLayer) for m in block.modules())


def step_params(block: nn.Module, weight_steps: bool) -> list[nn.Parameter]:
    """The steps of the block's activation quantizers (and of its weight quantizers, if they train)."""
    kinds = (WeightQuantizer, ActQuantizer) if weight_steps else (ActQuantizer,)
    return list({id(m.step): m.step for m in block.modules() if isinstance(m, kinds)}.values())


@dataclass
class BlockData:
    """What one block trains on, per batch: the quantized path's input, the FP block's output, the timesteps,
    and when the parts need them, the FP block's input and its layers' outputs (FBR's layer targets)."""

    inputs: list[dict]
    targets: list[torch.Tensor]
    t: list[torch.Tensor]
    shares: list[float]
    fp_inputs: list[dict] | None = None
    layer_names: list[str] | None = None
    layer_targets: list[list[torch.Tensor]] | None = None


def block_examples(quantized: QuantizedDenoiser, data: BlockData, config: CalibConfig) -> list[tuple]:
    """Per batch: (input, FP input when the mixing reads it, target, layer targets, timestep rows, loss weight)."""
    device = data.targets[0].device
    return [(data.inputs[i], data.fp_inputs[i] if config.input_mixing in FP_INPUTS else None, data.targets[i],
             data.layer_targets[i] if data.layer_targets else [], quantized.index.lookup(data.t[i]),
             torch.tensor(data.shares[i], device=device)) for i in range(len(data.inputs))]  # fmt: skip


def train_block(quantized: QuantizedDenoiser, block: nn.Module, data: BlockData, config: CalibConfig, seed: int,
                ranks: Ranks = SINGLE) -> dict:  # fmt: skip
    """Train one block on its cached data with the config's reconstruction parts; returns the final loss and
    whether the iterations replayed a CUDA graph.

    On several ranks each holds its rows of every batch: its loss is weighted by its share of the batch and the
    gradients are summed over the ranks, which is the whole batch's gradient, so every rank takes the same Adam step.
    The all-reduce and Adam's step then run outside the CUDA graph (capturing a collective is not attempted)."""
    rounding = WEIGHT_ROUNDINGS[config.weight_rounding](block, config)
    groups = rounding.param_groups()
    # Steps span orders of magnitude (8-bit vs 4-bit, weights vs activations): their learning rate is
    # relative to each tensor's own mean step.
    groups += [{"params": [step], "lr": config.bkd_lr_step * float(step.detach().abs().mean())}
               for step in step_params(block, rounding.trains_weight_steps())]  # fmt: skip
    trained = [p for group in groups for p in group["params"]]
    for p in trained:
        p.requires_grad_(True)
    device, examples = data.targets[0].device, block_examples(quantized, data, config)
    graphed = config.bkd_cuda_graph and device.type == "cuda" and replayable(examples) and config.bkd_iters > WARMUP
    optimizer = torch.optim.Adam(groups, capturable=graphed)  # capturable: Adam's state stays on the device
    schedule, bases = LR_SCHEDULES[config.bkd_lr_schedule], [group["lr"] for group in groups]
    if graphed and schedule is not None:  # a replayed Adam step reads its rates from device tensors
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(group["lr"], device=device)
    order = torch.randint(len(examples), (config.bkd_iters,), generator=torch.Generator().manual_seed(seed)).tolist()
    loss_fn, mix, names = LOSSES[config.recon_loss], MIXERS[config.input_mixing], data.layer_names or []
    loss = torch.zeros(())
    # QDrop's masks come from the default generator of the data's device (a replayed graph draws from it),
    # seeded here and forked so the caller's random state is left as it was
    with layer_outputs(block, names) as outputs, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)

        def step(example) -> torch.Tensor:
            inputs, fp_inputs, target, layer_targets, rows, share = example
            quantized.index.set_rows(rows)
            args, kwargs = inputs["args"], inputs["kwargs"]
            if mix is not None:
                args = mix(args, fp_inputs["args"], config.qdrop_prob, None)
                kwargs = mix(kwargs, fp_inputs["kwargs"], config.qdrop_prob, None)
            output = first_tensor(block(*args, **kwargs))
            loss = loss_fn(output, target, [outputs[n] for n in names], layer_targets, config.fbr_lambda)
            optimizer.zero_grad(set_to_none=True)
            (loss * share if ranks.active else loss).backward()
            if not ranks.active:
                optimizer.step()
            return loss

        def update() -> None:  # on several ranks: the whole batch's gradient, then the step
            ranks.all_reduce([p.grad for p in trained if p.grad is not None], "sum", "distillation")
            optimizer.step()

        after = update if ranks.active else None
        run, first = step, 0
        if graphed:  # the warm-up iterations run at the first iteration's rates
            run, first = replayed(step, [examples[i] for i in order[:WARMUP]], after), WARMUP
            graphed = run is not step
        for k in range(first, len(order)):
            if schedule is not None:
                set_rates(optimizer, bases, schedule(k, len(order)))
            loss = run(examples[order[k]])
            if after is not None and not graphed:
                after()
    for p in trained:  # a gradient left behind would keep the memory (and a replayed graph's whole pool) on the device
        p.requires_grad_(False)
        p.grad = None
    rounding.finish()
    return {"loss": float(loss.detach()), "cuda_graph": graphed}


def replayed(step, warmup: list, after=None):
    """The step as a replayed CUDA graph (`after` run eagerly after each), or (when its forward cannot be captured,
    e.g. a host sync in it) the step itself, with a warning."""
    try:
        return GraphedStep(step, warmup, after)
    except RuntimeError as error:
        warnings.warn(f"CUDA graph capture failed, this block trains eagerly: {error}", stacklevel=2)
        return step


def set_rates(optimizer: torch.optim.Optimizer, bases: list[float], fraction: float) -> None:
    for group, base in zip(optimizer.param_groups, bases):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(base * fraction)
        else:
            group["lr"] = base * fraction


def distill(quantized: QuantizedDenoiser, fp: Denoiser, data: CalibrationData, config: CalibConfig,
            device: torch.device, work: WorkDir, progress: bool = True, ranks: Ranks = SINGLE, offload: bool = False) -> dict:  # fmt: skip
    """Distil every block in call order, resuming from `work`'s checkpoints (rank 0's); returns per-block statistics.
    `offload`: both models' blocks stay in host memory but the one that runs (calibrate/offload.py)."""
    quantized.requires_grad_(False)
    fp_modules, q_modules = dict(fp.model.named_modules()), dict(quantized.model.named_modules())
    data_batches = batches(data, fp, config.bkd_batch, device, ranks)
    probe = data_batches[0]
    blocks = get_family(fp.family).blocks(fp.model)
    stats = {}
    with offloaded([fp.model, quantized.model], blocks, device, offload) as (_, q_offload):
        names = call_order(blocks, fp_modules, lambda: torch.no_grad()(fp)(probe.x, probe.t, probe.cond))
        for index, name in enumerate(tqdm(names, desc="distil blocks", disable=not progress)):
            block = q_modules[name]
            if not has_quantized_layers(block):
                continue  # nothing quantized inside (e.g. a boundary layer kept in FP)
            saved = ranks.from_main(lambda: work.load_block(index, name), "reading a block checkpoint")
            if saved is not None:
                block.load_state_dict(saved)
                stats[name] = {"resumed": True}
                continue
            with q_offload.resident(name):
                stats[name] = distill_block(quantized, fp, fp_modules[name], block, data_batches, config, device,
                                            seed=config.seed * 1000 + index, ranks=ranks)  # fmt: skip
                ranks.from_main(lambda: work.save_block(index, name, block.state_dict()), "saving a block checkpoint")
    return stats


def distill_block(quantized: QuantizedDenoiser, fp: Denoiser, fp_block: nn.Module, block: nn.Module,
                  data_batches: list[Batch], config: CalibConfig, device: torch.device, seed: int,
                  ranks: Ranks = SINGLE) -> dict:  # fmt: skip
    start, held = time.perf_counter(), None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)  # the models' part on the device (all, or one block when offloaded)
    data = block_data(quantized, fp, fp_block, block, data_batches, config)
    initial = {k: v.clone() for k, v in block.state_dict().items()}
    before = mean_loss(quantized, block, data, ranks)
    trained = train_block(quantized, block, data, config, seed, ranks)
    after = mean_loss(quantized, block, data, ranks)
    if after > before:  # never leave a block worse on its own calibration data than initialisation did
        block.load_state_dict(initial)
    record = {"mse_before": before, "mse_after": min(before, after), "kept_initialisation": after > before,
              "seconds": round(time.perf_counter() - start, 2), "cuda_graph": trained["cuda_graph"], "cache_mib": round(cache_bytes(data.inputs, data.targets) / 2**20, 1)}  # fmt: skip
    if device.type == "cuda":
        record["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        record["start_cuda_mib"] = round(held / 2**20, 1)
    return record


@torch.no_grad()
def mean_loss(quantized: QuantizedDenoiser, block: nn.Module, data: BlockData, ranks: Ranks = SINGLE) -> float:
    """The block's output MSE averaged over the batches (each batch's over all ranks' rows)."""
    total = 0.0
    for i, inputs in enumerate(data.inputs):
        quantized.index.set_timesteps(data.t[i])
        loss = F.mse_loss(first_tensor(block(*inputs["args"], **inputs["kwargs"])), data.targets[i]).item()
        total += loss * data.shares[i] if ranks.active else loss
    return ranks.sum(total, "distillation") / len(data.inputs)


def cache_bytes(inputs: list[dict], targets: list[torch.Tensor]) -> int:
    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (tuple, list)):
            return sum(size(v) for v in value)
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        return 0

    return size(inputs) + size(targets)


def block_data(quantized: QuantizedDenoiser, fp: Denoiser, fp_block: nn.Module, block: nn.Module,
               data_batches: list[Batch], config: CalibConfig) -> BlockData:  # fmt: skip
    """The block's training data; the FP block's inputs only for parts that read them (QDrop, FBR)."""
    data = BlockData([run_captured(quantized, block, "inputs", b) for b in data_batches],
                     [run_captured(fp, fp_block, "output", b)["output"] for b in data_batches], [b.t for b in data_batches],
                     [b.share for b in data_batches])  # fmt: skip
    layer_loss = config.recon_loss in LAYER_TARGETS
    if config.input_mixing in FP_INPUTS or layer_loss:
        data.fp_inputs = [run_captured(fp, fp_block, "inputs", b) for b in data_batches]
    if layer_loss:
        data.layer_names, data.layer_targets = fbr_targets(fp_block, quant_layer_names(block), data.fp_inputs)
    return data


@torch.no_grad()
def fbr_targets(fp_block: nn.Module, names: list[str], fp_inputs: list[dict]) -> tuple[list[str], list[list[torch.Tensor]]]:
    """The block's quantized layers but the last in call order (its output is nearly the block's), and their FP
    outputs on the FP input, per batch."""
    modules = dict(fp_block.named_modules())
    first = fp_inputs[0]
    names = call_order(names, modules, lambda: fp_block(*first["args"], **first["kwargs"]))[:-1]
    targets = []
    for fp_input in fp_inputs:
        with layer_outputs(fp_block, names) as outputs:
            fp_block(*fp_input["args"], **fp_input["kwargs"])
        targets.append([outputs[n].detach() for n in names])
    return names, targets

