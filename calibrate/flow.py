"""`calibrate()`: the one entry point of calibrate/ — model in, calibration artifact out."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from dilatequant.core.denoiser import load_model, model_fingerprint
from dilatequant.core.environment import describe_device
from dilatequant.core.finite import require_finite
from dilatequant.core.manifest import check_replaceable
from dilatequant.core.output import claim_output
from dilatequant.core.sampling import SamplerConfig, default_batch_size, sampling_timesteps

from .artifact import KIND, CalibrationRecord, write_artifact
from .bkd import distill
from .calib_data import attach_prompts, collect
from .config import CalibConfig
from .dilation import summarise
from .distributed import SINGLE, Ranks, process_group
from .group_search import ModelFitness, search_group_sizes
from .initialise import activation_tables, initialise_activations, restore_tables
from .offload import host_copy, should_offload
from .quant_model import prepare
from .recipes import parts_that_ran, recorded_recipe
from .workdir import WorkDir


class PhaseTimer:
    """Wall time, and on CUDA peak allocated memory, per named phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_cuda_mib: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        if cuda:
            self.peak_cuda_mib[name] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def record(self) -> dict:
        """What calibration.json's `run` holds: seconds and peak memory per phase, device, process peak RSS."""
        run = {"seconds": self.seconds, "device": describe_device(self.device),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # fmt: skip
        if self.peak_cuda_mib:
            run["peak_cuda_mib"] = self.peak_cuda_mib
        return run


FIX_RANGES = "An activation took a non-finite value on the calibration data: check the model on these inputs."
FIX_LEARNED = ("Training diverged: lower the learning rate or the iterations (--bkd-iters, --reparam-iters), and check "
               "that the model and calibration inputs are finite.")


def quantizer_tensors(quantized) -> dict[str, torch.Tensor]:
    """Every activation table (activation_tables' names) and weight step of the fake-quant model."""
    steps = {f"{name}::weight_step": w.weight_quantizer.step.detach() for name, w in quantized.quant_layers().items()}
    return {**activation_tables(quantized), **steps}


def calibrate(model: str | Path, config: CalibConfig, out: str | Path, device: torch.device | str = "cpu",
              progress: bool = True, fitness: ModelFitness | None = None, assume_schedule: bool = False) -> Path:  # fmt: skip
    """Calibrate `model` (zoo name or local directory) and write the artifact to `out`.

    Progress is kept in `OUT.work/` (calibration data, the group-size search's state, one checkpoint per distilled
    block): running the same command again after a crash or kill resumes there and writes the same artifact.
    `fitness(model) -> float` replaces the group-size search's default (calibrate/group_search.py);
    `assume_schedule`: a model without a scheduler config is calibrated on the default DDPM schedule (recorded).
    Started by torchrun (`torchrun --nproc-per-node N -m dilatequant calibrate ...`), the ranks share the work
    (calibrate/distributed.py) and rank 0 writes the artifact and the work dir; the artifact records the world size.
    """
    device, out = torch.device(device), Path(out)
    with process_group(device) as (ranks, device):
        ranks.from_main(lambda: check_replaceable(out, KIND), "checking the output")  # fail before the long work
        progress = progress and ranks.main
        with claim_output(out, notify=tqdm.write if progress else None) if ranks.main else nullcontext():
            return calibrate_claimed(model, config, out, device, progress, fitness, assume_schedule, ranks)


def calibrate_claimed(model: str | Path, config: CalibConfig, out: Path, device: torch.device, progress: bool,
                      fitness: ModelFitness | None, assume_schedule: bool = False, ranks: Ranks = SINGLE) -> Path:  # fmt: skip
    """calibrate() once `out` is claimed: every phase, each checked for non-finite results. Files are rank 0's: the
    others get what it read through `ranks.from_main`."""
    timer = PhaseTimer(device)
    loaded = load_model(model, device, assume_schedule)  # refuses non-finite weights and a missing schedule
    fingerprint = model_fingerprint(loaded.model_dir)
    work = WorkDir(out, {"config": config.to_dict(), "source": fingerprint})
    if ranks.from_main(work.open, "opening the work directory") and progress:
        tqdm.write(f"resuming from {work.path}: {work.describe()}")
    batch_size = default_batch_size(device)
    timesteps = sampling_timesteps(loaded.scheduler_config, SamplerConfig(config.scheduler, config.steps))
    with timer.phase("calibration_data"):
        data = ranks.from_main(work.load_data, "reading the calibration data")
        attach_prompts(loaded, config, data)  # a resumed run's prompts are those it recorded
        if data is None:
            data = collect(loaded.denoiser, loaded.scheduler_config, config, device, batch_size, progress, ranks)
            require_finite({"x": data.x}, f"The calibration inputs recorded along '{model}''s FP trajectories",
                           "The model's own sampling diverges; check the model and its scheduler config.")  # fmt: skip
            ranks.from_main(lambda: work.save_data(data), "saving the calibration data")
    distilling = parts_that_ran(config).reconstruction == "block-distillation"
    offload = distilling and should_offload(config.bkd_offload, loaded.denoiser, device)
    # distillation and the group-size search compare against the FP model, kept on the device; an offloaded
    # distillation's is a copy in host memory (the device holds one model); otherwise it is not needed again
    reference = host_copy(loaded.denoiser) if offload and not config.group_search else loaded.denoiser
    in_place = reference is not loaded.denoiser or not (distilling or config.group_search)
    with timer.phase("transforms"):  # dilation and the post-norm reparameterisation, where configured
        quantized, records, reparameterised = prepare(loaded.denoiser, timesteps, config, data, batch_size, progress, in_place=in_place)
    with timer.phase("initialisation"):
        saved = ranks.from_main(work.load_initialisation, "reading the initialisation")
        if saved is None:
            ranges = initialise_activations(quantized, data, config.act_init, config.percentile, batch_size, device, progress,
                                            ranks=ranks)  # fmt: skip
            require_finite(quantizer_tensors(quantized), "The observed activation ranges", FIX_RANGES)
            ranks.from_main(lambda: work.save_initialisation(ranges, activation_tables(quantized)), "saving the initialisation")
        else:  # a resumed run: the (MSE) search is not redone
            ranges, tables = saved
            restore_tables(quantized, tables)
    searched = None
    if config.group_search:
        with timer.phase("group_search"):
            searched = search_group_sizes(quantized, loaded, config, device, work.path / "group_search.json", fitness, progress, ranks)
    blocks = {}
    if distilling:
        with timer.phase("distillation"):
            blocks = distill(quantized, reference, data, config, device, work, progress, ranks, offload)
        if timer.peak_cuda_mib:  # each block resets the CUDA peak counter: the phase peak is their maximum
            block_peaks = [b["peak_cuda_mib"] for b in blocks.values() if "peak_cuda_mib" in b]
            timer.peak_cuda_mib["distillation"] = max([timer.peak_cuda_mib["distillation"], *block_peaks])
    require_finite({**quantizer_tensors(quantized), **quantized.fp_state_dict()}, "The calibrated parameters", FIX_LEARNED)
    run = {**timer.record(), **ranks.record(), **({"bkd_offload": offload} if distilling else {})}
    if ranks.active:  # every rank's own peaks: the memory a rank needs
        run["per_rank"] = ranks.gather({k: v for k, v in run.items() if k in ("peak_rss_mib", "peak_cuda_mib")}, "the run record")
    record = CalibrationRecord(
        config=config.to_dict(),
        recipe=recorded_recipe(config),
        timesteps=[int(t) for t in timesteps],
        source={"spec": str(model), "fingerprint": fingerprint,
                "class_name": type(loaded.denoiser.model).__name__, "family": loaded.denoiser.family},
        statistics={"dilation": summarise(list(records.values())), "groups": {
            name: {**ranges[name], **(records[name].stats() if name in records else {})} for name in ranges},
            "blocks": blocks, "data_selection": data.selection, **({"group_search": searched} if searched else {}),
            **({"reparameterisation": reparameterised} if reparameterised else {})},
        run=run,
    )  # fmt: skip

    def write() -> Path:
        path = write_artifact(out, loaded, quantized, records, data, record)
        work.remove()
        return path

    return ranks.from_main(write, "writing the artifact")
