"""The calibrated timestep grid and the per-call index that tells every quantizer its samples' rows.

Tables are keyed by the scheduler's timestep value t (0..999), not by step index: a sampler with another
step count finds the nearest calibrated row.
"""

from __future__ import annotations

import torch


class TimestepIndex:
    """Holds the timestep grid (one row per value) and, during a denoiser call, each sample's row.

    One instance is shared by the quantized denoiser (which sets it from `t` before every call) and all
    its activation quantizers (which read it). It is explicit state of one model, not a global.
    """

    def __init__(self, grid: torch.Tensor) -> None:
        grid = torch.as_tensor(grid).long().flatten()
        if len(grid) == 0 or len(set(grid.tolist())) != len(grid):
            raise ValueError(f"A timestep grid needs distinct values; got {grid.tolist()}.")
        self.grid = grid
        self._grids = {grid.device: grid}  # the grid on every device it was looked up on
        self._rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.grid)

    def lookup(self, t: torch.Tensor) -> torch.Tensor:
        """Row of the nearest grid value for every timestep in t, on t's device (no host round trip: a
        synchronisation per call would stall the GPU between reconstruction iterations)."""
        t = torch.as_tensor(t).detach()
        grid = self._grids.get(t.device)
        if grid is None:
            grid = self._grids[t.device] = self.grid.to(t.device)
        return (t.flatten().long()[:, None] - grid[None, :]).abs().argmin(1)

    def set_timesteps(self, t: torch.Tensor) -> None:
        self._rows = self.lookup(t)

    def set_rows(self, rows: torch.Tensor) -> None:
        """Use these rows (from `lookup`) for the next calls: a replayed CUDA graph reads them in place."""
        self._rows = rows

    def rows_for(self, leading: int) -> torch.Tensor:
        """Rows for a tensor whose leading dimension is the batch (or the batch times heads, batch-major)."""
        if self._rows is None:
            raise RuntimeError("TimestepIndex used outside a denoiser call: set_timesteps() was not called.")
        batch = len(self._rows)
        if leading == batch:
            return self._rows
        if leading % batch:
            raise RuntimeError(f"Activation with leading dimension {leading} does not split into the batch of {batch}.")
        return self._rows.repeat_interleave(leading // batch)
