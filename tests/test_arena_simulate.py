"""The arena simulation (tools/arena/simulate.py): rank MSE, the windowed convergence, and small K-Sort vs ELO runs."""

import json
import random
from collections import Counter
from dataclasses import replace

import pytest

from dilatequant.tools.arena.simulate import (
    ELO,
    KSORT,
    SimulationConfig,
    chart,
    converged_at,
    downsample,
    estimated_order,
    fresh,
    gaussian,
    rank_mse,
    simulate,
    trace,
    vote,
)

SMALL = SimulationConfig(models=10, window=200, budget=20_000, ucb_budget=3000, new_budget=2000)


@pytest.fixture(scope="module")
def small_reports() -> list[dict]:
    return [simulate(replace(SMALL, seed=seed)) for seed in range(3)]


def test_rank_mse_is_0_for_the_true_order_and_n2_minus_1_over_3_for_the_reversed():
    n = 10
    assert rank_mse({name: -name for name in range(n)}) == 0
    assert rank_mse({name: name for name in range(n)}) == pytest.approx((n * n - 1) / 3)  # Σ(2i − n + 1)² / n
    assert rank_mse({0: 1.0, 1: 0.0, 2: 0.5}) == pytest.approx(2 / 3)  # 1 and 2 swapped


def test_a_tie_never_counts_as_right():
    """Equal scores go worst true rank first: all tied is the reversed order, not (as dict order would give) the truth."""
    assert estimated_order(dict.fromkeys(range(5), 25.0)) == [4, 3, 2, 1, 0]
    assert rank_mse(dict.fromkeys(range(10), 25.0)) == pytest.approx(33)


@pytest.mark.parametrize(
    ("errors", "window", "expected"),
    [
        ([1, 0, 0, 1, 0, 0, 0], 3, 5),  # the first run of 3 zeros starts at vote 5
        ([1, 0, 0, 1, 0, 0, 0], 2, 2),  # an earlier run long enough counts, even if an error follows it
        ([1, 0, 0, 1, 0, 0, 0], 4, None),  # the window is not complete by the end
        ([0, 0, 0], 3, 1),
        ([], 1, None),
        ([0.04, 0, 0.04, 0, 0], 2, 4),
    ],
)
def test_converged_at_is_the_first_vote_of_the_first_window_of_zeros(errors, window, expected):
    assert converged_at(errors, window) == expected


def test_trace_stops_once_the_window_is_complete():
    wrong, right = {0: 0.0, 1: 1.0}, {0: 1.0, 1: 0.0}
    votes = iter([([0, 1], wrong)] * 3 + [([0, 1], right)] * 100)
    errors = trace(votes, SimulationConfig(models=4, window=5), budget=1000)
    assert errors == [1.0] * 3 + [0.0] * 5 and converged_at(errors, 5) == 4


def test_a_vote_orders_by_true_rank_without_noise_and_at_random_with_it():
    rng = random.Random(0)
    assert vote([7, 2, 9, 4], rng, noise=0.0) == [2, 0, 3, 1]
    orders = {tuple(vote([0, 1, 2, 3], rng, noise=1.0)) for _ in range(200)}
    assert len(orders) > 12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_free_k_sort_on_10_models_converges_and_ranks_them_exactly(seed):
    ratings, config = fresh(list(range(10))), replace(SMALL, seed=seed)
    errors = trace(gaussian(ratings, config, random.Random(seed), 4, ucb=True, counts=Counter()), config, config.ucb_budget)
    assert converged_at(errors, config.window) is not None
    assert estimated_order({name: r.mu for name, r in ratings.items()}) == list(range(10))


def test_k_sort_converges_in_fewer_votes_than_elo(small_reports):
    for report in small_reports:
        assert report["converged_at"][KSORT] < report["converged_at"][ELO]
        assert report["ratio_elo_over_ksort"] == pytest.approx(report["converged_at"][ELO] / report["converged_at"][KSORT], rel=0.01)


def test_the_new_variant_is_placed_and_the_report_is_json(small_reports):
    for report in small_reports:
        placed = report["new_variant"]
        assert placed["others_converged_at"] is not None
        assert placed["votes_to_place"] is not None and placed["votes_to_place"] <= placed["votes_to_converge"]
        assert placed["its_matches_to_place"] <= placed["votes_to_place"]
        assert json.loads(json.dumps(report))["converged_at"] == report["converged_at"]


def test_downsampled_curves_keep_the_worst_error_and_the_last_vote():
    errors = [5.0, 3.0] + [0.0] * 500 + [0.04] + [0.0] * 500
    curve = downsample(errors, 20)
    assert curve[-1][0] == len(errors) and len(curve) <= 21
    assert max(e for _, e in curve if _ > 502) == 0.04  # the late swap survives
    assert [503, 0.04] in curve and curve[-1][1] == 0  # and the right stretch after it shows as 0
    assert [v for v, _ in curve] == sorted({v for v, _ in curve})


def test_chart_writes_a_png(small_reports, tmp_path):
    chart(small_reports[0], tmp_path / "arena.png")
    assert (tmp_path / "arena.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_new_variants_rank_is_the_papers_31_of_50_scaled_and_must_lie_in_the_arena():
    assert SimulationConfig().new_rank == 31 and SMALL.new_rank == 6
    with pytest.raises(ValueError):
        SimulationConfig(models=10, new_rank=31)
