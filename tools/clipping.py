"""How much of a calibrated model's activation error is clipping, on trajectories the calibration never saw?

    python -m dilatequant.tools.clipping --calib DIR [--calib DIR2 ...] [--n 64] [--seed 7] --out clipping.json

Samples with the fake-quantized model (every quantizer on, as deployed) from noise of another seed than the
calibration's, and splits each activation quantizer's squared error into clipping (values beyond the grid's
range) and rounding (the rest), per timestep. A table fitted to few samples per timestep can be tight where
unseen samples are not: its clipping shows here, where the calibration's own data shows none.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from dilatequant.calibrate.quantizer import fake_quantize
from dilatequant.core.atomic import atomic_write_text
from dilatequant.core.environment import resolve_device
from dilatequant.core.evaluate import labels_for
from dilatequant.core.sampling import SamplerConfig, default_batch_size, sample


class ErrorSplit:
    """Per timestep of the calibrated grid: elements seen, elements clipped, clipping and rounding squared error."""

    def __init__(self, rows: int) -> None:
        self.seen, self.clipped, self.clip_error, self.round_error = (torch.zeros(rows, dtype=torch.float64) for _ in range(4))

    def observe(self, quantizer, x: torch.Tensor) -> None:
        x = quantizer.prescaled(x)
        step, zero = quantizer.per_sample(x, quantizer.step.detach()), quantizer.per_sample(x, quantizer.zero_point)
        lo, hi = (quantizer.fmt.qmin - zero) * step, (quantizer.fmt.qmax - zero) * step
        x = x.detach().float()
        beyond = (x - torch.clamp(x, lo, hi)).pow(2).flatten(1)
        error = (fake_quantize(x, step, zero, quantizer.fmt) - x).pow(2).flatten(1)  # what the quantizer outputs
        rows = quantizer.index.rows_for(len(x)).cpu()  # each sample's timestep, also for a one-row (shared) table
        for name, value in (("seen", torch.full((len(x),), float(beyond.shape[1]))), ("clipped", (beyond > 0).sum(1).double()),
                            ("clip_error", beyond.sum(1).double()), ("round_error", (error - beyond).clamp_min(0).sum(1).double())):
            getattr(self, name).index_add_(0, rows, value.double().cpu())  # fmt: skip


def error_split(calib: Path, n: int, seed: int, steps: int, device: torch.device) -> dict:
    from dilatequant.calibrate.artifact import load_artifact
    from dilatequant.core.denoiser import load_model

    artifact = load_artifact(calib, device)
    quantized, fp = artifact.model.denoiser, load_model(artifact.record.source["spec"], device)
    quantizers = quantized.act_quantizers()
    rows = len(quantized.index)
    splits = {name: ErrorSplit(rows) for name in quantizers}
    handles = [q.register_forward_pre_hook(lambda q, args, s=splits[name]: s.observe(q, args[0])) for name, q in quantizers.items()]
    try:
        sampler = SamplerConfig(steps=steps, seed=seed, batch_size=default_batch_size(device))
        sample(quantized, fp.scheduler_config, labels_for(fp, n), sampler, device, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    total = {k: sum(getattr(s, k) for s in splits.values()) for k in ("seen", "clipped", "clip_error", "round_error")}
    per_group = {name: {"clipped_share": float(s.clipped.sum() / s.seen.sum()),
                        "clip_share_of_error": float(s.clip_error.sum() / (s.clip_error.sum() + s.round_error.sum()).clamp_min(1e-30))}
                 for name, s in splits.items()}  # fmt: skip
    return {
        "calib": str(calib), "recipe": artifact.record.recipe.get("name"),
        "tables": "per timestep" if artifact.config.tpq else "one shared range",
        "clipped_share": float(total["clipped"].sum() / total["seen"].sum()),
        "clip_error": float(total["clip_error"].sum()), "round_error": float(total["round_error"].sum()),
        "per_timestep": {"timesteps": quantized.index.grid.tolist(), "clip_error": total["clip_error"].tolist(),
                         "round_error": total["round_error"].tolist()},
        "worst_groups": dict(sorted(per_group.items(), key=lambda kv: -kv[1]["clip_share_of_error"])[:8]),
    }  # fmt: skip


@click.command()
@click.option("--calib", "calibs", required=True, multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--n", default=64, show_default=True, help="Images sampled (unseen trajectories).")
@click.option("--seed", default=7, show_default=True, help="Noise seed; the calibrations' trajectories use theirs.")
@click.option("--steps", default=50, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(calibs: tuple[Path, ...], n: int, seed: int, steps: int, device: str, out_path: Path) -> None:
    """Split each calibration's activation error into clipping and rounding on unseen trajectories."""
    torch_device = resolve_device(device)
    results = [error_split(calib, n, seed, steps, torch_device) for calib in calibs]
    for r in results:
        click.echo(f"{r['calib']}: {r['tables']}, clipped {100 * r['clipped_share']:.4f}% of values, squared error "
                   f"clipping {r['clip_error']:.4g} + rounding {r['round_error']:.4g}")  # fmt: skip
    atomic_write_text(out_path, json.dumps({"n": n, "seed": seed, "steps": steps, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
