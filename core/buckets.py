"""Timestep buckets: K contiguous timestep ranges, each deployed as one graph with its own activation scales.

Plain data (saved in manifests, read without torch): the calibrated grid values sorted ascending are split into
K runs; boundaries sit midway between neighbouring grid values and the outer buckets extend to 0 and to the
last training timestep, so every t in [0, num_train_timesteps) belongs to exactly one bucket.
K = 1 is the single-scale deployment; K = the grid size is per-timestep. Export chooses the table
(export/buckets.py), calibrate fills a model's activation rows per bucket (calibrate/rebucket.py), engines look
timesteps up in it.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


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

    def buckets_of(self, t: ArrayLike) -> np.ndarray:
        """`bucket_of` for every element of `t` at once (an int64 array of t's shape; t: any array, CPU tensors too)."""
        return np.searchsorted(np.asarray(self.boundaries, dtype=np.float64), np.asarray(t, dtype=np.float64), side="left")

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
