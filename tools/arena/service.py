"""`Arena`: one running arena — the served variants, their gallery, the vote store, live ratings and matchmaking.

The web app (app.py), the metric judges and the CLI drive it; it knows nothing of HTTP. A vote is validated,
committed and applied to the live ratings under one lock, so the live ratings always equal a replay of the log.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from dilatequant.core.errors import UserError

from .gallery import ArenaVariant, Gallery
from .judges import JUDGES, make_judge, places_from_scores
from .leaderboard import agreement, apply_vote, replay, table
from .matchmaking import ALPHA, next_match
from .ratings import RATING_MODELS, best_vote_ranks
from .store import ArenaStore, Match, Vote

MODES = ("best", "rank")
JUDGE_PREFIX = "judge:"  # voter ids of metric judges; every other voter is human


class InvalidVote(UserError):
    """A vote that does not fit its match (mode, positions or places)."""


@dataclass(frozen=True)
class ArenaConfig:
    k: int = 4
    rating: str = "k-sort"  # a RATING_MODELS key
    reference: str | None = None  # the FP variant: 'tied with the reference' and the psnr judge
    bootstrap: int = 200  # leaderboard resamples
    alpha: float = ALPHA  # UCB exploration weight
    seed: int | None = None  # matchmaking and display order; None: fresh randomness

    def __post_init__(self) -> None:
        if self.rating not in RATING_MODELS:
            raise UserError(f"Unknown rating model '{self.rating}'; choose one of {', '.join(RATING_MODELS)}.")
        if self.k < 2:
            raise UserError(f"--k must be >= 2 (a match compares at least two images), got {self.k}.")


class Arena:
    def __init__(self, store: ArenaStore, gallery: Gallery, variants: list[ArenaVariant], config: ArenaConfig) -> None:
        names = [v.name for v in variants]
        if len(set(names)) != len(names) or len(names) < 2:
            raise UserError(f"An arena needs at least 2 variants with distinct names, got {names}.")
        if config.k > len(names):
            raise UserError(f"--k {config.k} shows more images than the {len(names)} variants served; pass --k {len(names)} or more variants.")
        if config.reference is not None and config.reference not in names:
            raise UserError(f"--reference '{config.reference}' is not a served variant ({', '.join(names)}).")
        for variant in variants:
            store.register_variant(variant.name, variant.spec, variant.kind, variant.sha256)
        self.store, self.gallery, self.config, self.names = store, gallery, config, names
        self.update = RATING_MODELS[config.rating]
        self.rng = random.Random(config.seed)
        self.lock = threading.Lock()
        votes = store.votes()
        self.ratings, self.counts = replay(votes, [*store.variants()], self.update)
        self.votes_applied = len(votes)  # the log's length, kept here so the leaderboard's cache check reads nothing
        self._board: tuple[int, dict] | None = None

    def new_match(self) -> tuple[Match, str]:
        """The next match (pivot and UCB opponents, in random display order) and its prompt."""
        with self.lock:
            served = {name: self.ratings[name] for name in self.names}
            shown = next_match(served, self.counts, self.config.k, self.rng, self.config.alpha)
            self.rng.shuffle(shown)
            item = self.rng.randrange(len(self.gallery.pool))
        return self.store.new_match(shown, item), self.gallery.pool[item].prompt

    def places(self, match: Match, mode: str, best: list[int] | None, places: list[int] | None) -> list[int]:
        k = len(match.shown)
        if mode == "best":
            if places is not None or not best:
                raise InvalidVote(f"A 'best' vote names the best image(s) by position 0..{k - 1} in 'best' (ties: several).")
            if len(set(best)) != len(best) or any(not 0 <= b < k for b in best):
                raise InvalidVote(f"'best' holds distinct positions 0..{k - 1} of the {k} shown images, got {best}.")
            if len(best) == k:
                raise InvalidVote("Every image marked best says nothing; pick fewer, or skip the match.")
            return best_vote_ranks(k, best)
        if mode == "rank":
            if best is not None or places is None or len(places) != k or any(not 0 <= p < k for p in places):
                raise InvalidVote(f"A 'rank' vote gives 'places': one place 0..{k - 1} (0 = best) per shown image, {k} in all; got {places}.")
            if len(set(places)) < 2:
                raise InvalidVote("A ranking with every image tied has no order; give different places.")
            return list(places)
        raise InvalidVote(f"Unknown vote mode '{mode}'; modes: {', '.join(MODES)}.")

    def vote(self, match_id: str, mode: str, voter: str, best: list[int] | None = None, places: list[int] | None = None) -> dict:
        """Validate, commit and apply one vote; returns the reveal (names in shown order, their new ratings)."""
        match = self.store.match(match_id)
        ranks = self.places(match, mode, best, places)
        with self.lock:
            self.store.add_vote(match, mode, ranks, voter)
            apply_vote(self.ratings, self.counts, match.shown, ranks, self.update)
            self.votes_applied += 1
            return {"match_id": match_id, "names": list(match.shown), "places": ranks,
                    "ratings": [{"mu": self.ratings[n].mu, "sigma": self.ratings[n].sigma} for n in match.shown]}  # fmt: skip

    def judge(self, name: str, matches: int, progress=lambda line: None) -> int:
        """Let metric judge `name` rank `matches` matches (pre-filling the arena); returns the votes cast, fewer
        where the judge saw no difference."""
        judge = make_judge(name, self.gallery, self.config.reference)
        cast = 0
        for i in range(matches):
            match, _ = self.new_match()
            places = places_from_scores(judge.scores(match.shown, self.gallery.pool[match.item]))
            if len(set(places)) > 1:  # all tied: no information, no vote
                self.vote(match.id, "rank", JUDGE_PREFIX + name, places=places)
                cast += 1
            if (i + 1) % 50 == 0:
                progress(f"arena judge {name}: {i + 1}/{matches} matches")
        return cast

    def judge_agreement(self, votes: list[Vote]) -> dict[str, dict]:
        """Per metric judge: mean Spearman ρ with the human votes on the same matches, and how many it covers."""
        human = [v for v in votes if not v.voter.startswith(JUDGE_PREFIX) and all(n in self.gallery.folders for n in v.shown)]
        result = {}
        for name in JUDGES:
            try:
                judge = make_judge(name, self.gallery, self.config.reference)
            except UserError as exc:
                result[name] = {"applies": False, "why": str(exc)}
                continue
            rhos = [agreement(places_from_scores(judge.scores(v.shown, self.gallery.pool[v.item])), v.places) for v in human]
            defined = [r for r in rhos if r is not None]
            result[name] = {"applies": True, "votes": len(defined), "spearman": sum(defined) / len(defined) if defined else None}
        return result

    def leaderboard(self) -> dict:
        """Rows (cached until the next vote) and the judges' agreement with humans."""
        if self._board is None or self._board[0] != self.votes_applied:
            votes = self.store.votes()
            rows = table(votes, [*self.store.variants()], self.update, self.config.reference, self.config.bootstrap)
            for row in rows:
                row["served"] = row["name"] in self.names
            board = {"rows": rows, "votes": len(votes), "human_votes": sum(not v.voter.startswith(JUDGE_PREFIX) for v in votes),
                     "rating": self.config.rating, "reference": self.config.reference, "bootstrap": self.config.bootstrap,
                     "judges": self.judge_agreement(votes)}  # fmt: skip
            self._board = (len(votes), board)
        return self._board[1]
