"""K-Sort Arena's web-free math: the K-wise Gaussian update and UCB matchmaking (tools/arena)."""

import math
import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dilatequant.tools.arena.matchmaking import FAST_TRACK_SHARE, choose_pivot, next_match, pair, record_match
from dilatequant.tools.arena.ratings import BETA, TAU, Rating, best_vote_ranks, kwise_update, v_w

mus = st.floats(min_value=0.0, max_value=50.0)
sigmas = st.floats(min_value=0.5, max_value=10.0)
ratings = st.builds(Rating, mus, sigmas)
# Skill gaps of up to ~3.5 c: beyond them trueskill and openskill approximate Φ's far tail less exactly than erfc.
near = st.builds(Rating, st.floats(min_value=15.0, max_value=35.0), sigmas)


def test_a_one_on_one_vote_is_trueskills_closed_form():
    """Two equal newcomers: d = 0, V = φ(0)/Φ(0) = 2φ(0), W = V², c² = 2β² + 2σ² (TrueSkill, no draw, τ = 0)."""
    winner, loser = kwise_update([Rating(), Rating()], [0, 1], tau=0.0)
    c = math.sqrt(2 * BETA**2 + 2 * Rating().sigma ** 2)
    v = 2 / math.sqrt(2 * math.pi)
    assert winner.mu == pytest.approx(25 + Rating().sigma ** 2 * v / c, rel=1e-12)
    assert loser.mu == pytest.approx(25 - Rating().sigma ** 2 * v / c, rel=1e-12)
    assert winner.sigma == pytest.approx(Rating().sigma * math.sqrt(1 - Rating().sigma ** 2 * v * v / c**2), rel=1e-12)


@given(st.lists(ratings, min_size=2, max_size=6), st.randoms(use_true_random=False))
def test_a_ranking_moves_every_winner_up_every_loser_down_and_shrinks_every_sigma(players, rng):
    """(Not strictly: a win that was certain, 48 over 0, teaches nothing a float can hold.)"""
    ranks = list(range(len(players)))
    rng.shuffle(ranks)
    after = kwise_update(players, ranks)
    first, last = ranks.index(0), ranks.index(len(players) - 1)
    assert after[first].mu >= players[first].mu and after[last].mu <= players[last].mu
    assert all(0 < a.sigma <= math.sqrt(b.sigma**2 + TAU**2) for a, b in zip(after, players))  # σ² + τ², then shrunk


@given(st.lists(ratings, min_size=3, max_size=5))
def test_a_kwise_vote_is_the_sum_of_its_pairwise_orders(players):
    """μ: each model's K-wise shift equals the sum of its one-on-one shifts from the same pre-vote ratings."""
    ranks = list(range(len(players)))
    after = kwise_update(players, ranks)
    for i, me in enumerate(players):
        pairwise = sum(kwise_update([me, other], [ranks[i], ranks[q]])[0].mu - me.mu for q, other in enumerate(players) if q != i)
        assert after[i].mu - me.mu == pytest.approx(pairwise, rel=1e-9, abs=1e-12)


def test_tau_keeps_a_settled_rating_learning():
    """Without τ, σ shrinks with every vote towards 0 and the ratings freeze; τ² added per vote keeps σ away from 0."""
    frozen = learning = [Rating(), Rating()]
    for game in range(2000):  # evenly matched: each wins every other game
        places = [game % 2, 1 - game % 2]
        frozen, learning = kwise_update(frozen, places, tau=0.0), kwise_update(learning, places)
    assert frozen[0].sigma < 0.5 * learning[0].sigma and learning[0].sigma > TAU


@given(ratings, ratings)
def test_swapping_the_players_mirrors_the_update(a, b):
    ab, ba = kwise_update([a, b], [0, 1]), kwise_update([b, a], [1, 0])
    assert ab == [ba[1], ba[0]]


def test_ties_carry_no_order_and_an_upset_moves_more_than_an_expected_win():
    tied = kwise_update([Rating(30, 2), Rating(20, 2)], [0, 0])
    assert [r.mu for r in tied] == [30, 20]  # only τ's added uncertainty
    assert all(r.sigma == pytest.approx(math.sqrt(4 + TAU**2)) for r in tied)
    expected = kwise_update([Rating(30, 2), Rating(20, 2)], [0, 1])
    upset = kwise_update([Rating(30, 2), Rating(20, 2)], [1, 0])
    assert abs(upset[1].mu - 20) > abs(expected[0].mu - 30)
    assert all(math.isfinite(v) for v in v_w(-40.0))  # far into the tail: no 0/0


def test_a_best_vote_puts_the_chosen_first_and_ties_the_rest():
    assert best_vote_ranks(4, [2]) == [1, 1, 0, 1]
    assert best_vote_ranks(4, [0, 3]) == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="by position 0..3"):
        best_vote_ranks(4, [4])
    with pytest.raises(ValueError, match="at least 2 participants"):
        kwise_update([Rating()], [0])


@given(st.integers(min_value=2, max_value=12), st.integers(min_value=2, max_value=6), st.randoms(use_true_random=False))
def test_a_match_is_distinct_variants_led_by_a_lagging_variant_when_there_is_one(n, k, rng):
    k = min(k, n)
    names = [f"v{i}" for i in range(n)]
    table = {name: Rating(rng.uniform(10, 40), rng.uniform(1, 8)) for name in names}
    counts = Counter()
    for _ in range(rng.randint(0, 20)):
        record_match(counts, rng.sample(names, k))
    match = next_match(table, counts, k, rng)
    compared = {name: sum(v for key, v in counts.items() if name in key) for name in names}
    assert len(match) == len(set(match)) == k and set(match) <= set(names)
    mean = sum(compared.values()) / n
    if min(compared.values()) < FAST_TRACK_SHARE * mean or mean == 0:  # a lagging variant leads (fast track)
        assert compared[match[0]] == min(compared.values())


def test_a_new_variant_is_fast_tracked_and_never_compared_pairs_come_first():
    names = ["fp", "w8a8", "w4a8", "new"]
    counts = Counter()
    for _ in range(5):
        record_match(counts, ["fp", "w8a8", "w4a8"])
    table = {name: Rating() for name in names}
    match = next_match(table, counts, 2, random.Random(0))
    assert match[0] == "new"  # no comparisons yet: the pivot
    counts[pair("new", "fp")] += 1
    counts[pair("new", "w8a8")] += 1
    assert next_match(table, counts, 2, random.Random(0)) == ["new", "w4a8"]  # its one never-compared partner
    with pytest.raises(ValueError, match="2 to 4 of the 4 variants"):
        next_match(table, counts, 5, random.Random(0))


def test_once_no_variant_lags_every_variant_gets_to_be_the_pivot():
    """The paper's always-least-compared pivot settles into a rotation of a few variants; ours draws the pivot at
    random once comparisons are balanced, so every variant leads matches."""
    names = [f"v{i}" for i in range(12)]
    counts, rng = Counter(), random.Random(0)
    table = {name: Rating(25 + i, 2.0) for i, name in enumerate(names)}
    pivots = Counter()
    for _ in range(600):
        match = next_match(table, counts, 4, rng)
        record_match(counts, match)
        pivots[match[0]] += 1
    assert set(pivots) == set(names) and min(pivots.values()) > 600 / 12 / 3
    assert choose_pivot([*names, "new"], counts, rng) == "new"  # a newcomer still jumps the queue


@given(near, near, st.booleans())
def test_a_one_on_one_vote_equals_the_trueskill_package(a, b, a_wins):
    """K = 2 (no draw): the pairwise closed form is TrueSkill's exact two-player update, τ dynamics included."""
    import trueskill

    env = trueskill.TrueSkill(mu=25.0, sigma=25.0 / 3.0, beta=BETA, tau=TAU, draw_probability=0.0)
    ranks = [0, 1] if a_wins else [1, 0]
    expected = env.rate([(env.create_rating(a.mu, a.sigma),), (env.create_rating(b.mu, b.sigma),)], ranks=ranks)
    for got, (want,) in zip(kwise_update([a, b], ranks), expected):
        assert got.mu == pytest.approx(want.mu, rel=1e-6, abs=1e-9)
        assert got.sigma == pytest.approx(want.sigma, rel=1e-6)


@given(st.lists(near, min_size=2, max_size=6), st.randoms(use_true_random=False))
def test_a_kwise_ranking_equals_openskills_full_pairing_thurstone_mosteller(players, rng):
    """The paper's K-wise decomposition is Weng & Lin's Thurstone-Mosteller full pairing (openskill) with no draw
    margin and γ = 1 (the paper divides W by c², openskill's default γ = σ/c would scale it)."""
    from openskill.models import ThurstoneMostellerFull

    model = ThurstoneMostellerFull(mu=25.0, sigma=25.0 / 3.0, beta=BETA, tau=TAU, epsilon=0.0, gamma=lambda *args: 1.0)
    ranks = list(range(len(players)))
    rng.shuffle(ranks)  # a strict ranking: openskill scores ties with draw terms, the paper skips them
    teams = [[model.rating(mu=p.mu, sigma=p.sigma)] for p in players]
    for got, (want,) in zip(kwise_update(players, ranks), model.rate(teams, ranks=ranks)):
        assert got.mu == pytest.approx(want.mu, rel=1e-6, abs=1e-9)
        assert got.sigma == pytest.approx(want.sigma, rel=1e-6)


def test_the_deployed_multiplayer_form_orders_winners_over_losers_and_treats_ties_as_draws():
    from dilatequant.tools.arena.ratings import trueskill_update

    first, tied_a, tied_b, last = trueskill_update([Rating()] * 4, [0, 1, 1, 2])
    assert first.mu > tied_a.mu > last.mu
    assert tied_a.mu == pytest.approx(tied_b.mu, abs=0.05)  # the factor graph's schedule breaks the symmetry slightly
    assert all(r.sigma < Rating().sigma for r in (first, tied_a, last))


def test_the_arena_math_imports_no_web_stack():
    """ratings, matchmaking, the vote store and the leaderboard load without FastAPI, uvicorn or the rating packages."""
    import subprocess
    import sys

    code = ("import sys; import dilatequant.tools.arena.ratings, dilatequant.tools.arena.matchmaking, "
            "dilatequant.tools.arena.store, dilatequant.tools.arena.leaderboard; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'trueskill', 'openskill') if m in sys.modules))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
