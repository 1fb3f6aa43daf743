"""`dilatequant arena simulate`: how many votes each rating scheme needs before its ranking of N simulated variants
is right and stays right (K-Sort Arena's experiment, algorithms.md §5.4).

Variants have hidden true ranks 0..N−1 (their names). A voter ranks the K shown variants by true rank; with
probability `noise` a vote is a random order instead. After every vote the estimated ranking is compared with the
truth: rank MSE. Equal scores are ordered worst-true-rank first, so a tie (e.g. unplayed newcomers) never counts
as right.

Converged (budget-free): the first vote n after which the rank MSE is 0 for `window` consecutive votes, n to
n + window − 1. A scheme stops once its window is complete; one that does not complete it within its budget
(`budget`, `ucb_budget` for UCB runs) reports None.

Estimated ranking: ELO by rating; Gaussian schemes by μ (`rank_by="mu"`, the default), the posterior mean, a point
estimate like ELO's that does not depend on how recently a variant played. The leaderboard's conservative μ − 3σ
(`rank_by="conservative"`) was tried too: at 50 variants, noise 0, seeds 0–7, both converge in 4 of 8 seeds (within
8,000 votes) at similar votes, and in none at noise 0.05; settled σ are nearly equal (~0.6), so the two orders
rarely differ. It mainly changes where a newcomer starts: near the bottom (σ0 = 25/3), as in the paper.

Why neighbours kept swapping with the paper's pivot (noise 0, measured): an always-least-compared pivot settles into a
fixed rotation of about a third of the variants; the others only ever play as a pivot's K − 1 nearest (UCB). Two
true neighbours that sit between two pivots' neighbourhoods rarely meet: one plays at the bottom of the upper group
(loses all, falls), the other at the top of the lower group (wins all, rises), so their μ gap closes to ~0 and they
swap back and forth. τ keeps σ at ~0.6 so every such one-sided match still moves μ by ~0.1; with τ = 0 σ collapses
(~0.1) before the order is right and misplaced variants are frozen (noise 0: no vote with MSE 0 in 20,000; at
noise 0.05 the random votes unfreeze them and τ = 0 converges, where the deployed τ does not).
A random pivot (same UCB opponents) converged in 4 of 4 seeds at noise 0 and 3 of 4 at noise 0.05 (the
least-compared pivot: 2 and 0 of those 4), so matchmaking.py now draws the pivot at random unless a variant lags
(fast track); docs/results/arena.md has the runs.

Schemes:
- ELO: K = 2, random pairs, point ratings (K-factor 32, scale 400);
- Gaussian, K = 2, random pairs; Gaussian, K = 4, random matches (no UCB);
- K-Sort: K = 4, a full ranking per vote, UCB matchmaking (matchmaking.py).
Then a new variant (true rank 31 of 51 by default) joins the converged K-Sort arena: the votes until its own place
is right for a window, and until the whole ranking is, are counted.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

from .matchmaking import next_match, record_match
from .ratings import TAU, Rating, kwise_update

ELO_K, ELO_SCALE, ELO_START = 32.0, 400.0, 1000.0

Votes = Iterator[tuple[list[int], Mapping[int, float]]]  # after each vote: who was shown, every variant's score


@dataclass(frozen=True)
class SimulationConfig:
    models: int = 50
    noise: float = 0.0  # share of votes that are a random order
    seed: int = 0
    window: int = 1000  # votes the rank MSE must stay 0 for: ~80 K=4 matches per variant at 50 variants
    budget: int = 150_000  # votes at most per random-match scheme (cheap; ELO needs 56k–104k at 50 variants, seeds 0–7)
    ucb_budget: int = 20_000  # votes at most per UCB run (next_match costs ~2 ms at 50 variants)
    rank_by: str = "mu"  # Gaussian schemes' estimated ranking: "mu" or "conservative" (μ − 3σ)
    tau: float = TAU  # skill dynamics passed to kwise_update; the deployed trueskill value by default
    new_rank: int | None = None  # the true rank of the variant added to the converged K-Sort arena; None: the paper's
    # 31 of 50, scaled to `models`
    new_budget: int = 5000  # votes at most after the new variant joins
    curve_points: int = 400  # per scheme in the report; the chart and JSON keep each stretch's worst MSE

    def __post_init__(self) -> None:
        if self.new_rank is None:
            object.__setattr__(self, "new_rank", round(self.models * 31 / 50))  # frozen: resolved once, shown in reports
        if self.rank_by not in ("mu", "conservative") or not 0 <= self.new_rank <= self.models or self.models < 4:
            raise ValueError(f"rank_by is mu or conservative, 4 <= models, 0 <= new_rank <= models: {self}")


def vote(shown: list[int], rng: random.Random, noise: float) -> list[int]:
    """Places of the shown variants (0 = best): by true rank (lower is better), or a random order."""
    order = sorted(range(len(shown)), key=lambda i: shown[i])
    if rng.random() < noise:
        rng.shuffle(order)
    places = [0] * len(shown)
    for place, i in enumerate(order):
        places[i] = place
    return places


def estimated_order(scores: Mapping[int, float]) -> list[int]:
    """Names, highest score first; equal scores worst true rank first, so that a tie never looks right."""
    return sorted(scores, key=lambda name: (-scores[name], -name))


def rank_mse(scores: Mapping[int, float]) -> float:
    """Mean squared distance between each variant's estimated place and its true place among the scored."""
    truth = {name: place for place, name in enumerate(sorted(scores))}
    return sum((place - truth[name]) ** 2 for place, name in enumerate(estimated_order(scores))) / len(scores)


def place_error(scores: Mapping[int, float], name: int) -> int:
    """How many places `name` is from its true place."""
    return abs(estimated_order(scores).index(name) - sorted(scores).index(name))


def converged_at(errors: list[float], window: int) -> int | None:
    """The first vote n (1-based) with errors 0 at votes n..n + window − 1; None without such a run."""
    run = 0
    for vote_number, error in enumerate(errors, start=1):
        run = run + 1 if error == 0 else 0
        if run == window:
            return vote_number - window + 1
    return None


def trace(votes: Votes, config: SimulationConfig, budget: int) -> list[float]:
    """Rank MSE after each vote, stopping once the window is complete (so the budget only caps non-convergers)."""
    errors, run = [], 0
    for _, scores in islice(votes, budget):
        errors.append(rank_mse(scores))
        run = run + 1 if errors[-1] == 0 else 0
        if run == config.window:
            break
    return errors


def elo(names: list[int], config: SimulationConfig, rng: random.Random) -> Votes:
    rating = dict.fromkeys(names, ELO_START)
    while True:
        a, b = rng.sample(names, 2)
        places = vote([a, b], rng, config.noise)
        expected = 1.0 / (1.0 + 10 ** ((rating[b] - rating[a]) / ELO_SCALE))
        change = ELO_K * ((1.0 if places[0] < places[1] else 0.0) - expected)
        rating[a], rating[b] = rating[a] + change, rating[b] - change
        yield [a, b], rating


def score(rating: Rating, rank_by: str) -> float:
    return rating.mu if rank_by == "mu" else rating.conservative


def gaussian(ratings: dict[int, Rating], config: SimulationConfig, rng: random.Random, k: int, ucb: bool,
             counts: Counter | None = None) -> Votes:  # fmt: skip
    """K-wise Gaussian updates with random or UCB matches among `ratings`' keys; `ratings` and `counts` are
    updated in place, so that a caller can add a variant between votes."""
    counts = counts if counts is not None else Counter()
    while True:
        shown = next_match(ratings, counts, k, rng) if ucb else rng.sample(list(ratings), k)
        record_match(counts, shown)
        updated = kwise_update([ratings[n] for n in shown], vote(shown, rng, config.noise), tau=config.tau)
        ratings.update(zip(shown, updated))
        yield shown, {name: score(r, config.rank_by) for name, r in ratings.items()}


def fresh(names: list[int]) -> dict[int, Rating]:
    return {name: Rating() for name in names}


ELO, KSORT = "ELO (K=2, random pairs)", "K-Sort (K=4, UCB)"
SCHEMES: dict[str, Callable[[list[int], SimulationConfig, random.Random], Votes]] = {
    ELO: elo,
    "Gaussian, K=2, random pairs": lambda names, config, rng: gaussian(fresh(names), config, rng, 2, ucb=False),
    "Gaussian, K=4, random matches": lambda names, config, rng: gaussian(fresh(names), config, rng, 4, ucb=False),
    KSORT: lambda names, config, rng: gaussian(fresh(names), config, rng, 4, ucb=True),
}


def new_variant(config: SimulationConfig, rng: random.Random) -> dict:
    """Converge K-Sort on the others, then add a variant of true rank `new_rank` with a fresh rating and count
    the votes until its place, and then the whole ranking, are right for a window."""
    new = config.new_rank
    ratings, counts = fresh([r for r in range(config.models + 1) if r != new]), Counter()
    before = converged_at(trace(gaussian(ratings, config, rng, 4, ucb=True, counts=counts), config, config.ucb_budget), config.window)
    ratings[new] = Rating()
    start = place_error({name: score(r, config.rank_by) for name, r in ratings.items()}, new)
    placed, ranked, shown_with, runs = [], [], [], (0, 0)
    for shown, scores in islice(gaussian(ratings, config, rng, 4, ucb=True, counts=counts), config.new_budget):
        placed.append(place_error(scores, new))
        ranked.append(rank_mse(scores))
        shown_with.append(new in shown)
        runs = tuple(run + 1 if error == 0 else 0 for run, error in zip(runs, (placed[-1], ranked[-1])))
        if min(runs) == config.window:
            break
    at_place, at_rank = converged_at(placed, config.window), converged_at(ranked, config.window)
    return {"true_rank": new, "of": config.models + 1, "others_converged_at": before, "places_off_when_added": start,
            "votes_to_place": at_place, "its_matches_to_place": sum(shown_with[:at_place]) if at_place else None,
            "votes_to_converge": at_rank}  # fmt: skip


def downsample(errors: list[float], points: int) -> list[list[float]]:
    """[vote, worst MSE since the previous point] at about `points` log-spaced votes, so that a single late swap
    still shows; the last vote and the last wrong one are points, so that a final right stretch shows as 0."""
    last_wrong = max((n for n, error in enumerate(errors, start=1) if error != 0), default=len(errors))
    ends = sorted({min(len(errors), round(len(errors) ** (i / points))) for i in range(1, points + 1)} | {last_wrong})
    start, curve = 0, []
    for end in ends:
        curve.append([end, max(errors[start:end])])
        start = end
    return curve


def longest_right_run(errors: list[float]) -> int:
    """The most consecutive votes with rank MSE 0: what a scheme that did not converge came closest to."""
    best = run = 0
    for error in errors:
        run = run + 1 if error == 0 else 0
        best = max(best, run)
    return best


def simulate(config: SimulationConfig, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Every scheme's rank-MSE curve and convergence vote, the ELO/K-Sort ratio, and the new variant's placement."""
    names = list(range(config.models))
    curves, converged, first_right, longest, votes_run, seconds = {}, {}, {}, {}, {}, {}
    for scheme, votes in SCHEMES.items():
        budget = config.ucb_budget if scheme == KSORT else config.budget
        progress(f"simulate: {scheme}, up to {budget} votes")
        began = time.perf_counter()
        errors = trace(votes(names, config, random.Random(config.seed)), config, budget)
        seconds[scheme] = round(time.perf_counter() - began, 1)
        converged[scheme] = converged_at(errors, config.window)
        first_right[scheme] = next((n for n, error in enumerate(errors, start=1) if error == 0), None)
        longest[scheme], votes_run[scheme] = longest_right_run(errors), len(errors)
        curves[scheme] = downsample(errors, config.curve_points)
    progress("simulate: a new variant joins the converged K-Sort arena")
    began = time.perf_counter()
    placed = new_variant(config, random.Random(config.seed))
    seconds["new variant"] = round(time.perf_counter() - began, 1)
    elo_at, ksort_at = converged[ELO], converged[KSORT]
    return {"config": asdict(config), "converged_at": converged, "first_right_at": first_right, "longest_right_run": longest,
            "votes_run": votes_run, "ratio_elo_over_ksort": round(elo_at / ksort_at, 2) if elo_at and ksort_at else None,
            "new_variant": placed, "seconds": seconds, "curves": curves}  # fmt: skip


def chart(report: dict, path: str | Path) -> None:
    """Rank MSE against votes (log scale), one line per scheme, its convergence marked."""
    from dilatequant.core.plots import require_matplotlib, save_figure

    plt = require_matplotlib()
    figure, axis = plt.subplots(figsize=(7, 4))
    for scheme, curve in report["curves"].items():
        at = report["converged_at"][scheme]
        votes, errors = zip(*curve)
        (line,) = axis.step(votes, errors, where="pre", lw=1, label=f"{scheme}: {f'converged at {at}' if at else 'not converged'}")
        if at:
            axis.axvline(at, color=line.get_color(), ls=":", lw=1)
    axis.set_xscale("log")
    axis.set_yscale("symlog", linthresh=2 / report["config"]["models"])  # linear up to one adjacent swap, so the tail shows
    axis.set_ylim(bottom=0)
    axis.set_xlabel("votes")
    axis.set_ylabel("rank MSE (worst since the previous point)")
    axis.set_title(f"{report['config']['models']} variants, noise {report['config']['noise']}, tau {report['config']['tau']:.3g}; "
                   f"dotted: converged (MSE 0 for {report['config']['window']} votes)", fontsize=9)  # fmt: skip
    axis.legend(fontsize=8)
    save_figure(figure, path)
