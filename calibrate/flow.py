"""`calibrate()`: the one entry point of calibrate/ — model in, calibration artifact out."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from dilatequant.tools.denoiser import load_model, model_fingerprint
from dilatequant.tools.environment import describe_device
from dilatequant.tools.sampling import SamplerConfig, default_batch_size, sampling_timesteps

from .artifact import CalibrationRecord, write_artifact
from .calib_data import collect
from .config import CalibConfig
from .dilation import summarise
from .initialise import initialise_activations
from .quant_model import prepare


class PhaseTimer:
    """Wall time per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process, and peak CUDA allocation when on a GPU (MiB)."""
    peak = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def calibrate(model: str | Path, config: CalibConfig, out: str | Path, device: torch.device | str = "cpu",
              progress: bool = True) -> Path:  # fmt: skip
    """Calibrate `model` (zoo name or local directory) and write the artifact to `out`."""
    device, timer = torch.device(device), PhaseTimer()
    loaded = load_model(model, device)
    batch_size = default_batch_size(device)
    timesteps = sampling_timesteps(loaded.scheduler_config, SamplerConfig(config.scheduler, config.steps))
    with timer.phase("calibration_data"):
        data = collect(loaded.denoiser, loaded.scheduler_config, config, device, batch_size, progress)
    with timer.phase("dilation"):
        quantized, records = prepare(loaded.denoiser, timesteps, config)
    with timer.phase("initialisation"):
        act_init = "minmax" if config.method == "minmax" else config.act_init
        ranges = initialise_activations(quantized, data, act_init, config.percentile, batch_size, device, progress)
    record = CalibrationRecord(
        config=config.to_dict(),
        timesteps=[int(t) for t in timesteps],
        source={"spec": str(model), "fingerprint": model_fingerprint(loaded.model_dir),
                "class_name": type(loaded.denoiser.model).__name__, "family": loaded.denoiser.family},
        statistics={"dilation": summarise(list(records.values())), "groups": {
            name: {**ranges[name], **(records[name].stats() if name in records else {})} for name in ranges}},
        run={"seconds": timer.seconds, "device": describe_device(device), **peak_memory(device)},
    )  # fmt: skip
    return write_artifact(Path(out), loaded, quantized, records, data, record)
