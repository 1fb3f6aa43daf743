"""Choosing the timestep buckets of an export: the K contiguous runs of the calibrated grid whose shared scales
cost the least estimated error (exact dynamic programming), or the fewest K within a tolerance of per-timestep.

The table itself is plain data in core/buckets.py; filling a model's rows per bucket is calibrate/rebucket.py.
"""

from __future__ import annotations

import torch

from dilatequant.core.buckets import BucketTable
from dilatequant.core.errors import UserError


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
    if steps.shape[0] == 0:  # no static table (e.g. every quantized input dynamic): nothing depends on the bucket
        return BucketTable(tuple(ascending), (0,), num_train_timesteps), {1: 1.0}
    partitions = optimal_partitions(segment_costs(steps), len(grid))
    floor = partitions[len(grid)][0]
    relative = {k: cost / floor for k, (cost, _) in partitions.items()}
    k = buckets if isinstance(buckets, int) else min(k for k, r in relative.items() if r <= 1 + tolerance)
    return BucketTable(tuple(ascending), partitions[k][1], num_train_timesteps), relative
