"""Timestep buckets: total, monotone, covering tables; exact DP partitions."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilatequant.export.buckets import BucketTable, choose_buckets, optimal_partitions, segment_costs
from dilatequant.tools.errors import UserError


@st.composite
def tables(draw):
    grid = sorted(draw(st.sets(st.integers(0, 999), min_size=1, max_size=40)))
    cuts = draw(st.sets(st.integers(1, len(grid) - 1), max_size=8)) if len(grid) > 1 else set()
    return BucketTable(tuple(grid), tuple(sorted({0} | cuts)))


@settings(max_examples=100, deadline=None)
@given(tables())
def test_buckets_are_total_monotone_and_cover_the_range(table):
    ranges = table.ranges()
    assert ranges[0][0] == 0 and ranges[-1][1] == 999
    assert all(lo <= hi for lo, hi in ranges) and all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))
    buckets = [table.bucket_of(t) for t in range(1000)]
    assert buckets == sorted(buckets) and set(buckets) == set(range(len(table)))
    halves = torch.arange(0, 1000, 0.5)  # the vectorised lookup agrees everywhere, boundaries (x.5) included
    assert table.buckets_of(halves).tolist() == [table.bucket_of(float(t)) for t in halves]
    for k, (lo, hi) in enumerate(ranges):
        assert table.bucket_of(lo) == k and table.bucket_of(hi) == k
        assert all(lo <= table.grid[r] <= hi for r in table.rows(k))  # calibrated timesteps land in their bucket
    assert BucketTable.from_dict(table.to_dict()) == table


def brute_force(cost: torch.Tensor, k: int) -> float:
    rows = cost.shape[0]
    best = float("inf")
    for cut in itertools.combinations(range(1, rows), k - 1):
        starts = (0, *cut, rows)
        best = min(best, sum(float(cost[a, b - 1]) for a, b in zip(starts, starts[1:])))
    return best


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 7), st.integers(1, 4), st.integers(0, 2**16))
def test_dynamic_programming_is_exact(rows, quantizers, seed):
    steps = torch.rand(quantizers, rows, generator=torch.Generator().manual_seed(seed)) + 0.1
    cost = segment_costs(steps)
    partitions = optimal_partitions(cost, rows)
    for k in range(1, rows + 1):
        assert partitions[k][0] == pytest.approx(brute_force(cost, k))
    assert partitions[rows][0] == pytest.approx(quantizers * rows)  # per-timestep: every ratio is 1


def test_choose_buckets_splits_where_ranges_jump_and_auto_meets_the_tolerance():
    grid = [999, 749, 499, 249, 0]  # sampler order (descending)
    steps = torch.tensor([[1.0, 1.0, 1.0, 0.1, 0.1]])  # small steps at t = 249 and 0
    table, error = choose_buckets(grid, steps, 2)
    assert table.grid == (0, 249, 499, 749, 999) and table.starts == (0, 2)
    assert error[2] == pytest.approx(1.0) and error[1] > 10
    auto, _ = choose_buckets(grid, steps, "auto", tolerance=0.1)
    assert len(auto) == 2


def test_too_many_buckets_is_a_user_error():
    with pytest.raises(UserError, match="--buckets 6 is outside 1..5"):
        choose_buckets([0, 1, 2, 3, 4], torch.ones(1, 5), 6)
