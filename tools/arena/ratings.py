"""Gaussian skill ratings updated by K-wise votes (K-Sort Arena, algorithms.md §5.2).

Each variant's skill is N(μ, σ²); a voter perceives it with preference noise β. A K-wise vote (a ranking, ties
allowed) is decomposed into its pairwise orders, and each model's update sums the closed-form TrueSkill update
(no draw margin) against every participant it beat or lost to, all computed from the ratings before the vote:

    c² = 2β² + σ_i² + σ_q²,  d = (μ_winner − μ_loser) / c,  V(d) = φ(d) / Φ(d),  W(d) = V(d) (V(d) + d)
    μ_i ← μ_i ± σ_i² V(d) / c          (+ for a win, − for a loss)
    σ_i² ← σ_i² (1 − Σ σ_i² W(d) / c²)

after σ_i² += τ² (skill dynamics, so that σ never reaches 0 and ratings keep learning). Tied participants give no order, so no update between them. Defaults are the `trueskill` package's, which the
deployed arena used: μ0 = 25, σ0 = 25/3, β = 25/6, τ = 25/300. The leaderboard ranks by the conservative μ − 3σ.

`RATING_MODELS` names the two forms a vote log can be replayed with: `k-sort` (the paper's pairwise decomposition
above, written here) and `trueskill` (the deployed Space's one multi-player update per ranking, by the `trueskill`
package with its defaults, draw probability 0.1 included).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dilatequant.core.optional import require

MU0, SIGMA0, BETA = 25.0, 25.0 / 3.0, 25.0 / 6.0
TAU = 25.0 / 300.0  # skill dynamics: σ² grows by τ² before each vote, so learning never stops (trueskill's default)
CONSERVATIVE_SIGMAS = 3.0
MIN_VARIANCE_SHARE = 1e-4  # σ² never shrinks below this share of itself in one vote (guards W's tail)


@dataclass(frozen=True)
class Rating:
    mu: float = MU0
    sigma: float = SIGMA0

    @property
    def conservative(self) -> float:
        """μ − 3σ: what the leaderboard ranks by."""
        return self.mu - CONSERVATIVE_SIGMAS * self.sigma


def v_w(d: float) -> tuple[float, float]:
    """V(d) = φ(d)/Φ(d) and W(d) = V(d)(V(d) + d), with Φ from erfc (stable far into the lower tail)."""
    pdf = math.exp(-0.5 * d * d) / math.sqrt(2.0 * math.pi)
    cdf = 0.5 * math.erfc(-d / math.sqrt(2.0))
    v = pdf / cdf if cdf > 1e-300 else -d  # the tail's limit
    return v, v * (v + d)


def kwise_update(ratings: Sequence[Rating], ranks: Sequence[int], beta: float = BETA, tau: float = TAU) -> list[Rating]:
    """The ratings after one vote; `ranks[i]` is participant i's place (0 = best; equal places are ties)."""
    if len(ratings) != len(ranks) or len(ratings) < 2:
        raise ValueError(f"a vote ranks at least 2 participants, one place each (got {len(ratings)} ratings, {len(ranks)} places)")
    ratings = [Rating(r.mu, math.sqrt(r.sigma**2 + tau * tau)) for r in ratings]
    updated = []
    for i, me in enumerate(ratings):
        shift, shrink = 0.0, 0.0
        for q, other in enumerate(ratings):
            if q == i or ranks[q] == ranks[i]:
                continue
            c = math.sqrt(2.0 * beta * beta + me.sigma**2 + other.sigma**2)
            won = ranks[i] < ranks[q]
            v, w = v_w(((me.mu - other.mu) if won else (other.mu - me.mu)) / c)
            shift += (1.0 if won else -1.0) * me.sigma**2 * v / c
            shrink += me.sigma**2 * w / (c * c)
        variance = me.sigma**2 * max(1.0 - shrink, MIN_VARIANCE_SHARE)
        updated.append(Rating(me.mu + shift, math.sqrt(variance)))
    return updated


def best_vote_ranks(k: int, best: Sequence[int]) -> list[int]:
    """A 'best' vote as places: the chosen (one, or several when tied) first, the others tied second."""
    if not best or any(not 0 <= b < k for b in best):
        raise ValueError(f"a best vote names 1 to {k} of the {k} shown images by position 0..{k - 1}, got {list(best)}")
    return [0 if i in best else 1 for i in range(k)]


@functools.cache
def trueskill_env():
    """The deployed Space's environment: the `trueskill` package with its defaults (draw probability 0.1)."""
    return require("trueskill", "The arena's 'trueskill' rating model", "arena").TrueSkill(mu=MU0, sigma=SIGMA0, beta=BETA, tau=TAU)


def trueskill_update(ratings: Sequence[Rating], ranks: Sequence[int]) -> list[Rating]:
    """The deployed form: one multi-player TrueSkill update of the whole ranking (factor graph, ties as draws)."""
    env = trueskill_env()
    groups = env.rate([(env.create_rating(r.mu, r.sigma),) for r in ratings], ranks=list(ranks))
    return [Rating(group[0].mu, group[0].sigma) for group in groups]


RATING_MODELS: dict[str, Callable[[Sequence[Rating], Sequence[int]], list[Rating]]] = {
    "k-sort": kwise_update,
    "trueskill": trueskill_update,
}
