"""Timestep buckets: K contiguous timestep ranges, each deployed as one graph with its own activation scales.

Plain data (saved in manifests): the calibrated grid values sorted ascending are split into K runs;
boundaries sit midway between neighbouring grid values and the outer buckets extend to 0 and to the
last training timestep, so every t in [0, num_train_timesteps) belongs to exactly one bucket.
K = 1 is the single-scale deployment; K = the grid size is per-timestep.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch

from dilatequant.calibrate.artifact import CalibrationArtifact
from dilatequant.calibrate.initialise import Candidates, covering_grid, initialise_activations, select_rows, write_candidates
from dilatequant.calibrate.quant_model import OUTPUT_SUFFIX
from dilatequant.calibrate.timesteps import TimestepIndex
from dilatequant.core.denoiser import LoadedModel
from dilatequant.core.errors import UserError
from dilatequant.core.sampling import default_batch_size


@dataclass(frozen=True)
class BucketTable:
    grid: tuple[int, ...]  # calibrated timestep values, ascending
    starts: tuple[int, ...]  # index into `grid` of each bucket's first value; starts[0] == 0
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if list(self.grid) != sorted(set(self.grid)) or not self.grid:
            raise ValueError(f"grid must be distinct ascending timesteps, got {self.grid}")
        if not self.starts or self.starts[0] != 0 or list(self.starts) != sorted(set(self.starts)) or self.starts[-1] >= len(self.grid):
            raise ValueError(f"starts must begin at 0 and increase inside the grid, got {self.starts}")

    def __len__(self) -> int:
        return len(self.starts)

    @functools.cached_property
    def boundaries(self) -> list[float]:
        """The K-1 timestep values between buckets (midway between neighbouring grid values)."""
        return [(self.grid[s - 1] + self.grid[s]) / 2 for s in self.starts[1:]]

    def ranges(self) -> list[tuple[int, int]]:
        """Inclusive integer timestep range of each bucket; together they tile [0, num_train_timesteps - 1]."""
        edges = self.boundaries
        lows = [0] + [int(b) + 1 for b in edges]
        highs = [int(b) for b in edges] + [self.num_train_timesteps - 1]
        return list(zip(lows, highs))

    def bucket_of(self, t: int | float) -> int:
        """The bucket of timestep t: a t between two grid values goes with the nearer one (ties go down)."""
        return bisect.bisect_left(self.boundaries, float(t))

    def buckets_of(self, t: torch.Tensor) -> torch.Tensor:
        """`bucket_of` for every element of `t` at once (long tensor of t's shape, on the CPU)."""
        boundaries = torch.tensor(self.boundaries, dtype=torch.float64)
        return torch.bucketize(torch.as_tensor(t).detach().cpu().double(), boundaries, right=False)

    def rows(self, k: int) -> list[int]:
        """Indices into `grid` of bucket k's calibrated timesteps."""
        end = self.starts[k + 1] if k + 1 < len(self.starts) else len(self.grid)
        return list(range(self.starts[k], end))

    def to_dict(self) -> dict:
        return {"grid": list(self.grid), "starts": list(self.starts), "num_train_timesteps": self.num_train_timesteps,
                "ranges": self.ranges()}  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict) -> BucketTable:
        return cls(tuple(values["grid"]), tuple(values["starts"]), values.get("num_train_timesteps", 1000))


def segment_costs(steps: torch.Tensor) -> torch.Tensor:
    """cost[i, j]: estimated relative noise power of one shared scale for grid rows i..j (ascending t).

    `steps` is (quantizers, rows) of per-timestep steps. A shared scale must cover the largest range in the
    segment, so each row's noise power grows by (max step / own step)^2; summed over quantizers and rows.
    Rows run for j < i are +inf.
    """
    steps = steps.double()
    rows = steps.shape[1]
    # sum over rows of step^-2, as prefix sums per quantizer: the cost of i..j is sum_q max_q(i..j)^2 * that sum
    prefix = torch.cat([torch.zeros(steps.shape[0], 1, dtype=torch.float64), (steps**-2).cumsum(1)], 1)
    cost = torch.full((rows, rows), float("inf"), dtype=torch.float64)
    for i in range(rows):
        running_max = steps[:, i:].cummax(1).values
        cost[i, i:] = (running_max**2 * (prefix[:, i + 1 :] - prefix[:, i : i + 1])).sum(0)
    return cost


def optimal_partitions(cost: torch.Tensor, max_buckets: int) -> dict[int, tuple[float, tuple[int, ...]]]:
    """Exact dynamic programming: for every K <= max_buckets, the minimal total cost and bucket starts."""
    rows = cost.shape[0]
    best = torch.full((max_buckets + 1, rows + 1), float("inf"), dtype=torch.float64)
    choice = torch.zeros((max_buckets + 1, rows + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, max_buckets + 1):
        for end in range(k, rows + 1):  # first `end` rows in k buckets; the last bucket is rows start..end-1
            candidates = best[k - 1, k - 1 : end] + cost[k - 1 : end, end - 1]
            arg = int(torch.argmin(candidates))
            best[k, end], choice[k, end] = candidates[arg], arg + k - 1
    result = {}
    for k in range(1, max_buckets + 1):
        starts, end = [], rows
        for level in range(k, 0, -1):
            start = int(choice[level, end])
            starts.append(start)
            end = start
        result[k] = (float(best[k, rows]), tuple(reversed(starts)))
    return result


def choose_buckets(grid: list[int], steps: torch.Tensor, buckets: int | str, tolerance: float = 0.1,
                   num_train_timesteps: int = 1000) -> tuple[BucketTable, dict[int, float]]:  # fmt: skip
    """Bucket table for K buckets (or 'auto': the smallest K whose estimated error is within `tolerance`
    of per-timestep), plus the estimated error of every K relative to per-timestep (1.0 = per-timestep)."""
    order = sorted(range(len(grid)), key=lambda i: grid[i])
    ascending, steps = [grid[i] for i in order], steps[:, order]
    if isinstance(buckets, int) and not 1 <= buckets <= len(grid):
        raise UserError(f"--buckets {buckets} is outside 1..{len(grid)}, the number of calibrated timesteps.")
    partitions = optimal_partitions(segment_costs(steps), len(grid))
    floor = partitions[len(grid)][0]
    relative = {k: cost / floor for k, (cost, _) in partitions.items()}
    k = buckets if isinstance(buckets, int) else min(k for k, r in relative.items() if r <= 1 + tolerance)
    return BucketTable(tuple(ascending), partitions[k][1], num_train_timesteps), relative


class BucketIndex(TimestepIndex):
    """A TimestepIndex whose rows are buckets: each sample's timestep picks its bucket's row."""

    def __init__(self, table: BucketTable) -> None:
        super().__init__(torch.arange(len(table)))
        self.table = table

    def lookup(self, t: torch.Tensor) -> torch.Tensor:
        return self.table.buckets_of(torch.as_tensor(t).flatten())


def bucketed_model(artifact: CalibrationArtifact, table: BucketTable, device: torch.device | str = "cpu",
                   quantized_outputs: frozenset[str] = frozenset(), scales: str = "calibrated") -> LoadedModel:  # fmt: skip
    """The artifact's fake-quant model with one activation row per bucket.

    scales 'calibrated' (the default): each bucket takes the calibrated rows of its timesteps — exactly when it
    holds one timestep; otherwise, of its rows and the grid covering all of them, the one with the least
    quantization error on the bucket's calibration samples (the covering grid for min-max recipes, which
    equals min-max over the bucket's samples). So what distillation learned reaches the graphs.
    'rederived': every bucket re-initialised from its calibration samples (the calibration's initialisation
    method), ignoring the learned rows. The layers in `quantized_outputs` get bucketed 8-bit output
    quantizers, which calibration did not have; they are initialised from the bucket's samples either way.
    """
    loaded = artifact.rebuild(BucketIndex(table), device)
    config, denoiser = artifact.config, loaded.denoiser
    denoiser.quantize_outputs(quantized_outputs, 8, config.act_symmetric)
    quantizers = denoiser.act_quantizers()
    data, device = artifact.calibration_data(), torch.device(device)
    batch_size = default_batch_size(device)
    method = "minmax" if config.method == "minmax" else config.act_init
    inputs = [name for name in quantizers if not name.endswith(OUTPUT_SUFFIX)]
    new = None if scales == "rederived" else set(quantizers) - set(inputs)
    if new is None or new:
        initialise_activations(denoiser, data, method, config.percentile, batch_size, device, progress=False, only=new)
    if scales == "calibrated":
        candidates = {name: bucket_candidates(artifact, table, name, quantizers[name].fmt) for name in inputs}
        if method == "minmax":  # the covering grid (candidate 0) is min-max over the bucket's samples
            for name, rows in candidates.items():
                write_candidates(quantizers[name], rows, [0] * len(rows))
        else:
            select_rows(denoiser, data, candidates, batch_size, device, progress=False)
    return loaded


def bucket_candidates(artifact: CalibrationArtifact, table: BucketTable, group: str, fmt) -> Candidates:
    """Per bucket: the grid covering its calibrated rows, then the rows themselves (one row: just that row)."""
    steps, zeros = artifact.act_table(group)
    position = {t: i for i, t in enumerate(artifact.record.timesteps)}
    candidates = []
    for k in range(len(table)):
        rows = sorted({position[table.grid[r]] for r in table.rows(k)}) if len(steps) > 1 else [0]
        if len(rows) == 1:
            candidates.append((steps[rows], zeros[rows]))
            continue
        cover_step, cover_zero = covering_grid(steps[rows], zeros[rows], fmt)
        candidates.append((torch.cat([cover_step.reshape(1), steps[rows]]), torch.cat([cover_zero.reshape(1), zeros[rows]])))
    return candidates

