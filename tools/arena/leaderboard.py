"""The leaderboard: ratings replayed from the vote log, with bootstrap intervals and ties with the FP reference.

Ratings are a function of the ordered vote log (never stored), so the server's live ratings, `arena export` and
this table agree by construction (the load test checks it). Uncertainty is GenAI-Arena's: resample the votes with
replacement (kept in log order), replay, and take the 2.5 and 97.5 percentiles of each μ; a variant is
statistically tied with the reference when the 95% interval of its μ minus the reference's μ contains 0.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from scipy.stats import spearmanr

from .matchmaking import record_match
from .ratings import Rating
from .store import Vote

Update = Callable[[Sequence[Rating], Sequence[int]], list[Rating]]


def replay(votes: Iterable[Vote], names: Iterable[str], update: Update) -> tuple[dict[str, Rating], Counter]:
    """Ratings and pairwise comparison counts after the votes, in order, from the prior."""
    ratings, counts = {name: Rating() for name in names}, Counter()
    for vote in votes:
        apply_vote(ratings, counts, vote.shown, vote.places, update)
    return ratings, counts


def apply_vote(ratings: dict[str, Rating], counts: Counter, shown: Sequence[str], places: Sequence[int], update: Update) -> None:
    for name in shown:
        ratings.setdefault(name, Rating())
    for name, rating in zip(shown, update([ratings[name] for name in shown], places)):
        ratings[name] = rating
    record_match(counts, shown)


def bootstrap(votes: list[Vote], names: list[str], update: Update, reference: str | None, samples: int,
              seed: int = 0) -> tuple[dict[str, tuple[float, float]], dict[str, bool]]:  # fmt: skip
    """95% intervals of each μ, and whether each variant is statistically tied with `reference`."""
    if not votes or samples < 1:
        return {}, {}
    rng = random.Random(seed)
    mus: dict[str, list[float]] = {name: [] for name in names}
    gaps: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(samples):
        drawn = sorted(rng.randrange(len(votes)) for _ in votes)  # with replacement, in log order
        ratings, _ = replay((votes[i] for i in drawn), names, update)
        for name in names:
            mus[name].append(ratings[name].mu)
            if reference in ratings:
                gaps[name].append(ratings[name].mu - ratings[reference].mu)
    intervals = {name: tuple(np.percentile(v, [2.5, 97.5]).tolist()) for name, v in mus.items()}
    tied = {name: bool(np.percentile(g, 2.5) <= 0.0 <= np.percentile(g, 97.5)) for name, g in gaps.items() if g and name != reference}
    return intervals, tied


def votes_per_variant(votes: Iterable[Vote]) -> Counter:
    return Counter(name for vote in votes for name in vote.shown)


def table(votes: list[Vote], names: list[str], update: Update, reference: str | None, samples: int) -> list[dict]:
    """Leaderboard rows, best conservative score first."""
    ratings, _ = replay(votes, names, update)
    intervals, tied = bootstrap(votes, names, update, reference, samples)
    count = votes_per_variant(votes)
    rows = [{"name": name, "mu": r.mu, "sigma": r.sigma, "conservative": r.conservative, "votes": count[name],
             "ci95": intervals.get(name), "reference": name == reference, "tied_with_reference": tied.get(name)}
            for name, r in ratings.items()]  # fmt: skip
    return sorted(rows, key=lambda row: -row["conservative"])


def agreement(places_a: Sequence[int], places_b: Sequence[int]) -> float | None:
    """Spearman's ρ between two rankings of the same images (ties as average ranks); None if either is constant."""
    if len(set(places_a)) < 2 or len(set(places_b)) < 2:
        return None
    return float(spearmanr(places_a, places_b).statistic)
