"""Who plays next (K-Sort Arena, algorithms.md §5.3): the least-compared variant (the pivot; a newly added one is
fast-tracked because it has no comparisons) and its K − 1 opponents of highest UCB score,

    UCB(pivot, q) = −|S_pivot − S_q| + α √(2 ln n / n_pq),   infinite while n_pq = 0,

S the conservative score μ − 3σ, n all pairwise comparisons so far and n_pq those between the two: similar skills
are informative (exploitation), rarely compared pairs are uncertain (exploration). Ties break at random.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping

from .ratings import Rating

ALPHA = 1.0


def pair(a: str, b: str) -> frozenset[str]:
    return frozenset((a, b))


def record_match(counts: Counter, players: Iterable[str]) -> None:
    """Count one K-wise match as its K(K−1)/2 pairwise comparisons."""
    players = list(players)
    for i, a in enumerate(players):
        for b in players[i + 1 :]:
            counts[pair(a, b)] += 1


def next_match(ratings: Mapping[str, Rating], counts: Counter, k: int, rng: random.Random, alpha: float = ALPHA) -> list[str]:
    """The pivot first, then its K − 1 opponents, all distinct."""
    names = list(ratings)
    if not 2 <= k <= len(names):
        raise ValueError(f"a match shows 2 to {len(names)} of the {len(names)} variants, not {k}")
    compared = {name: sum(n for key, n in counts.items() if name in key) for name in names}
    pivot = min(names, key=lambda name: (compared[name], rng.random()))
    total = max(sum(counts.values()), 1)

    def ucb(other: str) -> float:
        n = counts[pair(pivot, other)]
        if n == 0:
            return math.inf
        return -abs(ratings[pivot].conservative - ratings[other].conservative) + alpha * math.sqrt(2.0 * math.log(total) / n)

    others = sorted((name for name in names if name != pivot), key=lambda name: (-ucb(name), rng.random()))
    return [pivot, *others[: k - 1]]
