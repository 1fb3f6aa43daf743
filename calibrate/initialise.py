"""Initialise every activation table row from that timestep's own calibration samples.

Observers hook the (pre-scaled) inputs of the activation quantizers while the dilated model runs in FP
over the calibration data. Rows come from per-row min/max, a per-sample percentile averaged per row, or
a per-row MSE search over clipping ranges (a second pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .calib_data import CalibrationData, run_over
from .distributed import SINGLE, Ranks
from .quant_model import QuantizedDenoiser
from .quantizer import ActQuantizer, IntFormat, asymmetric_step_and_zero, fake_quantize, symmetric_step

MSE_FRACTIONS = torch.linspace(0.3, 1.0, 15)
# The MSE search runs on a subset: ~5 samples per row of a 50-step grid, each with thousands of values,
# estimate a row's error curve well; the full set would triple the CPU calibration time.
MSE_SAMPLES = 256


class RowObserver:
    """Per-row (timestep) statistics of one quantizer's input, accumulated over batches on the quantizer's device
    (moving every observed activation to the CPU took half of a GPU calibration).

    Min/max reduce exactly in any order; the float sums of the percentile and MSE initialisations do not, so each
    batch's sums (and counts) are kept apart (`partials`) and added in batch order by `merge`, on one rank or several."""

    SUMS = ("count", "pct_lo", "pct_hi", "mse", "mse_count")

    def __init__(self, quantizer: ActQuantizer, percentile: float | None) -> None:
        cells, device = quantizer.step.numel(), quantizer.step.device  # rows, or rows x heads
        self.quantizer, self.percentile = quantizer, percentile
        self.lo, self.hi = torch.full((cells,), float("inf"), device=device), torch.full((cells,), float("-inf"), device=device)
        self.count = torch.zeros(cells, device=device)
        self.channel_amax: torch.Tensor | None = None
        self.pct_lo, self.pct_hi = torch.zeros(cells, device=device), torch.zeros(cells, device=device)
        self.mse = torch.zeros(cells, len(MSE_FRACTIONS), device=device)
        self.mse_count = torch.zeros(cells, device=device)
        self.partials: list[dict[str, torch.Tensor]] = []  # per batch this rank observed: its share of SUMS

    def start_batch(self) -> None:
        self.partials.append({name: torch.zeros_like(getattr(self, name)) for name in self.SUMS})

    def partial(self) -> dict[str, torch.Tensor]:
        """The current batch's sums (observing without start_batch makes everything one batch)."""
        if not self.partials:
            self.start_batch()
        return self.partials[-1]

    def add(self, partials: list[dict[str, torch.Tensor]]) -> None:
        """Add batches' sums, in the given (batch) order, and forget this rank's own."""
        for partial in partials:
            for name in self.SUMS:
                getattr(self, name).add_(partial[name].to(self.lo.device))
        self.partials = []

    def cells(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's table cell (its timestep row; with head columns, one cell per sample and head) and the
        values of each, flattened."""
        rows, heads = self.quantizer.rows(x), self.quantizer.heads
        if heads == 1:
            return rows, x.flatten(1)
        return (rows[:, None] * heads + torch.arange(heads, device=x.device)).flatten(), x.reshape(len(x) * heads, -1)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().to(self.lo.device)
        rows, flat = self.cells(x)
        self.lo.scatter_reduce_(0, rows, flat.amin(1), "amin")
        self.hi.scatter_reduce_(0, rows, flat.amax(1), "amax")
        self.partial()["count"].scatter_add_(0, rows, torch.ones(len(rows), device=x.device))
        if self.percentile is not None:  # per-sample percentiles, averaged per row in grid()
            k_hi = max(1, round(self.percentile / 100 * flat.shape[1]))
            self.partial()["pct_hi"].scatter_add_(0, rows, flat.kthvalue(k_hi, 1).values)
            self.partial()["pct_lo"].scatter_add_(0, rows, flat.kthvalue(max(1, flat.shape[1] - k_hi + 1), 1).values)
        dims = [d for d in range(x.dim()) if d != self.quantizer.channel_dim % x.dim()]
        amax = x.abs().amax(dim=dims)
        self.channel_amax = amax if self.channel_amax is None else torch.maximum(self.channel_amax, amax)

    def observe_mse(self, x: torch.Tensor) -> None:
        """Accumulate, per row, the quantization error of each candidate clipping range."""
        x = x.detach().float().to(self.lo.device)
        rows, flat = self.cells(x)
        fmt, partial = self.quantizer.fmt, self.partial()
        for k, fraction in enumerate(MSE_FRACTIONS.tolist()):
            step, zero = self.grid(fraction)
            error = (fake_quantize(flat, step[rows, None], zero[rows, None], fmt) - flat).pow(2).sum(1)
            partial["mse"][:, k].scatter_add_(0, rows, error)
        partial["mse_count"].scatter_add_(0, rows, torch.ones(len(rows), device=x.device))

    def grid(self, fraction: float, percentile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, zero point) per row for the observed range (or mean percentile range) scaled by fraction."""
        count = self.count.clamp_min(1)
        lo, hi = (self.pct_lo / count, self.pct_hi / count) if percentile else (self.lo, self.hi)
        lo, hi = torch.nan_to_num(lo, posinf=0.0) * fraction, torch.nan_to_num(hi, neginf=0.0) * fraction
        fmt = self.quantizer.fmt
        if fmt.symmetric:
            return symmetric_step(torch.maximum(lo.abs(), hi.abs()), fmt), torch.zeros_like(lo)
        return asymmetric_step_and_zero(lo, hi, fmt)

    def finish(self, method: str) -> None:
        """Write the chosen (step, zero point) rows into the quantizer."""
        self.add(self.partials)  # what merge() has not added (an observer used on its own)
        if method == "mse":  # rows the MSE subset missed take the clipping fraction of their nearest row
            best = self.mse.argmin(1)[self.nearest_row(self.mse_count > 0)]
            step, zero = self.grid(1.0)
            for k, fraction in enumerate(MSE_FRACTIONS.tolist()):
                candidate_step, candidate_zero = self.grid(fraction)
                step, zero = torch.where(best == k, candidate_step, step), torch.where(best == k, candidate_zero, zero)
        else:
            step, zero = self.grid(1.0, percentile=method == "percentile")
        nearest = self.nearest_row(self.count > 0)
        with torch.no_grad():
            self.quantizer.step.copy_(step[nearest].view_as(self.quantizer.step))
            self.quantizer.zero_point.copy_(zero[nearest].view_as(self.quantizer.zero_point))

    def nearest_row(self, has_data: torch.Tensor) -> torch.Tensor:
        """For every cell, itself if it has data, else the cell of the same head at the nearest timestep that has."""
        heads = self.quantizer.heads
        cells = torch.arange(len(has_data), device=has_data.device).view(-1, heads)
        columns = has_data.view(-1, heads)
        return torch.stack([cells[self.nearest_timestep(columns[:, h]), h] for h in range(heads)], 1).flatten()

    def nearest_timestep(self, has_data: torch.Tensor) -> torch.Tensor:
        """For every row, itself if it has data, else the row of the nearest timestep that has."""
        observed = has_data.nonzero().flatten()
        if len(observed) == len(has_data) or len(observed) == 0:
            return torch.arange(len(has_data), device=has_data.device)
        grid = self.quantizer.index.grid.float().to(has_data.device)
        return observed[(grid[:, None] - grid[observed][None, :]).abs().argmin(1)]

    def range_reduction(self) -> dict:
        """Per-tensor input range before and after dilation (|x|max over channels)."""
        after, dilation = self.channel_amax, self.quantizer.dilation.to(self.channel_amax.device)
        before = after * dilation if len(dilation) == len(after) else after
        return {"amax_before": float(before.max()), "amax_after": float(after.max()),
                "reduction": float(before.max() / after.max().clamp_min(1e-12))}  # fmt: skip


@contextmanager
def hooked(quantizers: dict[str, ActQuantizer], observe: str, observers: dict[str, RowObserver]) -> Iterator[None]:
    handles = [q.register_forward_hook(lambda m, i, o, name=name: getattr(observers[name], observe)(o))
               for name, q in quantizers.items()]  # fmt: skip
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def initialise_activations(quantized: QuantizedDenoiser, data: CalibrationData, method: str, percentile: float,
                           batch_size: int, device: torch.device, progress: bool = True,
                           only: set[str] | None = None, ranks: Ranks = SINGLE) -> dict[str, dict]:  # fmt: skip
    """Set every activation table (or those of the groups in `only`) from the calibration data, each rank observing
    its shard of the batches; returns per-group range statistics."""
    quantizers = {name: q for name, q in quantized.act_quantizers().items() if only is None or name in only}
    observers = {name: RowObserver(q, percentile if method == "percentile" else None) for name, q in quantizers.items()}

    def start_batch() -> None:
        for observer in observers.values():
            observer.start_batch()

    quantized.set_quantization(activations=False, weights=False)
    with hooked(quantizers, "observe", observers):
        run_over(quantized, data, batch_size, device, "observe ranges", progress, ranks, start_batch)
    merge(observers, -(-len(data) // batch_size), ranks, "observing activation ranges")
    if method == "mse":
        with hooked(quantizers, "observe_mse", observers):
            run_over(quantized, data.subset(MSE_SAMPLES), batch_size, device, "MSE search", progress, ranks, start_batch)
        merge(observers, -(-min(len(data), MSE_SAMPLES) // batch_size), ranks, "the MSE search")
    for observer in observers.values():
        observer.finish(method)
    quantized.set_quantization(activations=True, weights=True)
    return {name: observer.range_reduction() for name, observer in observers.items()}


def merge(observers: dict[str, RowObserver], n_batches: int, ranks: Ranks, phase: str) -> None:
    """Combine what every rank observed over its batches: min/max all-reduced; each batch's sums and counts added in
    batch order (as one process adds them), so every rank, and one rank alone, gets the same floats."""
    observed = list(observers.values())
    ranks.all_reduce([o.lo for o in observed], "min", phase)
    ranks.all_reduce([o.hi for o in observed], "max", phase)
    if ranks.active:  # a rank without batches has no channel maxima: gathered, not all-reduced
        amax = ranks.gather([None if o.channel_amax is None else o.channel_amax.cpu() for o in observed], phase)
        for observer, maxima in zip(observed, zip(*amax)):
            present = [m for m in maxima if m is not None]
            observer.channel_amax = torch.stack(present).amax(0).to(observer.lo.device) if present else None
    host = (lambda v: v.cpu()) if ranks.active else (lambda v: v)  # one process: no round trip
    mine = [[{k: host(v) for k, v in o.partials[j].items()} for o in observed] for j in range(len(ranks.shard(n_batches)))]
    batches = ranks.in_order(mine, n_batches, phase) if ranks.active else mine
    for k, observer in enumerate(observed):
        observer.add([batch[k] for batch in batches])


def activation_tables(quantized: QuantizedDenoiser) -> dict[str, torch.Tensor]:
    """Every activation table's steps and zero points, by '<group>::step' / '<group>::zero_point' (to resume from)."""
    tables = {}
    for name, quantizer in quantized.act_quantizers().items():
        tables[f"{name}::step"], tables[f"{name}::zero_point"] = quantizer.step.detach(), quantizer.zero_point
    return tables


def restore_tables(quantized: QuantizedDenoiser, tables: dict[str, torch.Tensor]) -> None:
    """Put back what activation_tables() saved, instead of initialising again, and switch quantization on."""
    with torch.no_grad():
        for name, quantizer in quantized.act_quantizers().items():
            quantizer.step.copy_(tables[f"{name}::step"])
            quantizer.zero_point.copy_(tables[f"{name}::zero_point"])
    quantized.set_quantization(activations=True, weights=True)


Candidates = list[tuple[torch.Tensor, torch.Tensor]]
"""Per row of a quantizer's table: the (steps, zero points) it may take, one candidate per element."""


def covering_grid(steps: torch.Tensor, zero_points: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The one grid (step, zero point) whose range covers every candidate's range."""
    if fmt.symmetric:
        return steps.max(), torch.zeros(())
    return asymmetric_step_and_zero(((fmt.qmin - zero_points) * steps).min(), ((fmt.qmax - zero_points) * steps).max(), fmt)


class CandidateObserver:
    """Per row, the summed quantization error of each of the row's candidates on the quantizer's inputs."""

    def __init__(self, quantizer: ActQuantizer, candidates: Candidates) -> None:
        self.quantizer, self.candidates = quantizer, candidates
        self.error = [torch.zeros(len(steps), dtype=torch.float64) for steps, _ in candidates]

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().cpu()
        rows = self.quantizer.rows(x)
        for row in rows.unique().tolist():
            steps, zeros = self.candidates[row]
            if len(steps) > 1:
                flat = x[rows == row].flatten()[None]
                error = (fake_quantize(flat, steps[:, None], zeros[:, None], self.quantizer.fmt) - flat).pow(2).sum(1)
                self.error[row] += error.double()

    def finish(self) -> list[int]:
        """Write each row's least-error candidate (the first one for rows without data); returns the choices."""
        chosen = [int(error.argmin()) for error in self.error]
        write_candidates(self.quantizer, self.candidates, chosen)
        return chosen


def write_candidates(quantizer: ActQuantizer, candidates: Candidates, chosen: list[int]) -> None:
    """Row r of the quantizer's table takes candidate chosen[r] of candidates[r]."""
    with torch.no_grad():
        for row, ((steps, zeros), k) in enumerate(zip(candidates, chosen)):
            quantizer.step[row], quantizer.zero_point[row] = steps[k], zeros[k]


def select_rows(quantized: QuantizedDenoiser, data: CalibrationData, candidates: dict[str, Candidates], batch_size: int,
                device: torch.device, progress: bool = True) -> dict[str, list[int]]:  # fmt: skip
    """Give every row of the groups in `candidates` the candidate with the least quantization error on the
    calibration samples of that row (MSE over the same subset as the MSE initialisation); returns the choice
    per group and row."""
    quantizers = quantized.act_quantizers()
    observers = {name: CandidateObserver(quantizers[name], rows) for name, rows in candidates.items()}
    quantized.set_quantization(activations=False, weights=False)
    with hooked({name: quantizers[name] for name in candidates}, "observe", observers):
        run_over(quantized, data.subset(MSE_SAMPLES), batch_size, device, "choose calibrated rows", progress)
    quantized.set_quantization(activations=True, weights=True)
    return {name: observer.finish() for name, observer in observers.items()}
