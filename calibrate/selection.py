"""Calibration-data selection: which (trajectory, step) pairs of the recorded FP trajectories calibrate.

    random   drawn at random from all (trajectory, step) pairs (DilateQuant's default)
    uniform  every timestep the same number of samples, each from a different trajectory
    tdac     EDA-DM's temporal density and diversity (TDAC): samples per timestep proportional to
             D_t + λ·V_t of a middle feature map (core/families.py `feature_site`), each sample from its own
             trajectory (../shared/research/algorithms.md §2.1)

Each selector returns the indices and a record of what it chose (samples per timestep, and TDAC's scores),
which calibration.json keeps under statistics.data_selection.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pool:
    """What the selectors choose from: `n_trajectories` FP trajectories of `timesteps` (sampling order), and for
    TDAC the middle feature map of the first batch of trajectories at every step, (steps, batch, ...)."""

    n_trajectories: int
    timesteps: list[int]
    features: torch.Tensor | None = None


@dataclass(frozen=True)
class Selection:
    trajectory: torch.Tensor  # (N,) trajectory index of each sample
    step: torch.Tensor  # (N,) step index of each sample
    record: dict  # mode, samples per timestep, selector-specific scores


def counts_record(mode: str, pool: Pool, step: torch.Tensor, **extra) -> dict:
    counts = torch.bincount(step, minlength=len(pool.timesteps))
    return {"mode": mode, "timesteps": pool.timesteps, "counts": counts.tolist(), **extra}


def select_random(pool: Pool, samples: int, generator: torch.Generator, **_) -> Selection:
    steps = len(pool.timesteps)
    flat = torch.randperm(pool.n_trajectories * steps, generator=generator)[:samples]
    trajectory, step = flat // steps, flat % steps
    return Selection(trajectory, step, counts_record("random", pool, step))


def select_uniform(pool: Pool, samples: int, generator: torch.Generator, **_) -> Selection:
    step = torch.arange(samples) % len(pool.timesteps)
    trajectory = torch.empty(samples, dtype=torch.long)
    for k in range(len(pool.timesteps)):
        chosen = step == k
        trajectory[chosen] = torch.randperm(pool.n_trajectories, generator=generator)[: int(chosen.sum())]
    return Selection(trajectory, step, counts_record("uniform", pool, step))


def min_max(values: torch.Tensor) -> torch.Tensor:
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else torch.zeros_like(values)


def pairwise_mse(features: torch.Tensor) -> torch.Tensor:
    """mean((F_t - F_u)^2) for every pair of steps of `features` (steps, ...)."""
    flat = features.reshape(features.shape[0], -1).double()
    return torch.cdist(flat, flat).pow(2) / flat.shape[1]


def radius_warning(features: torch.Tensor, radius: float) -> tuple[dict, str | None]:
    """The spread of the pairwise feature MSEs (recorded, to choose a radius by) and, when the radius lies outside
    it so that every step gets the same density, a warning that says so."""
    mse = pairwise_mse(features)[~torch.eye(features.shape[0], dtype=torch.bool)]
    spread = {"min": float(mse.min()), "median": float(mse.median()), "max": float(mse.max())}
    if mse.min() <= radius < mse.max():
        return spread, None
    side = "above every" if radius >= mse.max() else "below every"
    return spread, (f"TDAC radius {radius:g} is {side} pairwise feature MSE of this model (min {spread['min']:.3g}, median "
                    f"{spread['median']:.3g}, max {spread['max']:.3g}): every timestep gets the same density, so the counts "
                    "follow diversity alone. Set --tdac-radius inside that range for density to count.")  # fmt: skip


def tdac_scores(features: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(density, diversity) per step of `features` (steps, batch, ...), both min-max normalised.

    Density D_t: the number of other steps u with mean((F_t - F_u)^2) <= radius. Diversity V_t: the sum over
    u != t of sum(1 - cos(F_t, F_u)), the cosine taken along channels (dim 1 of a [B, C, H, W] map, the last
    dim of [B, tokens, C]) and summed over samples and positions.
    """
    steps = features.shape[0]
    others = ~torch.eye(steps, dtype=torch.bool)
    density = ((pairwise_mse(features) <= radius) & others).sum(1).double()
    channel = 2 if features.dim() == 5 else -1  # (steps, B, C, H, W) or (steps, B, tokens, C)
    unit = torch.nn.functional.normalize(features.double(), dim=channel).reshape(steps, -1)
    positions = unit.shape[1] / features.shape[channel]
    diversity = ((positions - unit @ unit.T) * others).sum(1)
    return min_max(density), min_max(diversity)


def tdac_counts(weights: torch.Tensor, samples: int) -> torch.Tensor:
    """Samples per step proportional to `weights`, rounded, the remainder fixed so that they sum to `samples`:
    missing ones go to the largest weights, extra ones come off the last steps that have any."""
    weights = weights if weights.sum() > 0 else torch.ones_like(weights)
    counts = (samples * weights / weights.sum()).round().long()
    order = torch.argsort(weights, descending=True, stable=True)
    for i in range(int(samples - counts.sum())):
        counts[order[i % len(order)]] += 1
    while counts.sum() > samples:
        counts[int(torch.nonzero(counts).max())] -= 1
    return counts


def select_tdac(pool: Pool, samples: int, generator: torch.Generator, radius: float = 3.0, lam: float = 1.2, **_) -> Selection:
    density, diversity = tdac_scores(pool.features, radius)
    spread, warning = radius_warning(pool.features, radius)
    if warning:
        warnings.warn(warning, stacklevel=2)
    counts = tdac_counts(density + lam * diversity, samples)
    labels = torch.repeat_interleave(torch.arange(len(counts)), counts)
    step = labels[torch.randperm(samples, generator=generator)]
    trajectory = torch.randperm(pool.n_trajectories, generator=generator)[:samples]  # each sample its own trajectory
    record = counts_record("tdac", pool, step, radius=radius, lam=lam, density=[round(v, 4) for v in density.tolist()],
                           diversity=[round(v, 4) for v in diversity.tolist()], feature_shape=list(pool.features.shape[1:]),
                           pairwise_mse=spread)  # fmt: skip
    return Selection(trajectory, step, record)


# The data-selection parts (calibrate/recipes.py PARTS["selector"]); tdac needs the pool's features.
SELECTORS: dict[str, Callable[..., Selection]] = {"random": select_random, "uniform": select_uniform, "tdac": select_tdac}
NEEDS_FEATURES = frozenset({"tdac"})
