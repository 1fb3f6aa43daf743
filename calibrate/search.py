"""Q-DiT's evolutionary search of group sizes: one gene (a group size) per quantized Linear, fitness from a callable.

A genome gives every layer a group size from the choices that divide its width. The budget is Q-DiT's BitOps
proxy: the mean group size must be at least `min_mean_group` (larger groups store fewer scales and cost fewer
operations); a genome below it is repaired by enlarging random genes, step by step. The first population holds
the uniform genome at the budget (Q-DiT seeds with all-128) and random legal genomes. Each later generation
breeds from the `top_k` fittest genomes evaluated so far: half mutants (every gene redrawn with probability
`mutation_p`), half uniform crossovers of two parents. Fitness is minimised (fid_digits of a small sample through
the fake-quantized model, for Q-DiT) and computed once per genome.

With a state file the search is resumable: each generation's candidates with the random state after drawing
them, and every fitness as soon as it is known, are written atomically, so a killed search goes on where it
stopped and ends with the result an uninterrupted one would have had. Its cost, the seconds of every run that
worked on it, is kept in the state file too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dilatequant.core.atomic import atomic_write_text
from dilatequant.core.errors import UserError

from .distributed import SINGLE, Ranks
from .groupwise import legal_group_sizes

Genome = tuple[int, ...]


@dataclass(frozen=True)
class SearchConfig:
    choices: tuple[int, ...] = (32, 64, 128)
    min_mean_group: float = 64.0
    population: int = 50
    top_k: int = 10
    generations: int = 10
    mutation_p: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.choices or min(self.choices) < 1:
            raise UserError(f"choices must be positive group sizes, got {self.choices}.")
        if self.population < 2 or not 1 <= self.top_k <= self.population or self.generations < 1:
            raise UserError(f"need population >= 2, 1 <= top_k <= population and generations >= 1 (got {self.population}, "
                            f"{self.top_k}, {self.generations}).")  # fmt: skip
        if not 0 <= self.mutation_p <= 1:
            raise UserError(f"mutation_p is a probability, got {self.mutation_p}.")


@dataclass
class SearchResult:
    best: dict[str, int]
    fitness: float
    history: list[dict] = field(default_factory=list)  # every generation's best: what the artifact records
    evaluations: int = 0
    seconds: float = 0.0  # wall time of the search, summed over the runs that resumed it
    resumed: bool = False


class Space:
    """The legal genomes: each layer's divisor choices, and the budget on their mean."""

    def __init__(self, widths: Mapping[str, int], config: SearchConfig) -> None:
        self.layers, self.budget = list(widths), config.min_mean_group
        self.options = []
        for layer, width in widths.items():
            options = legal_group_sizes(width, sorted(config.choices))
            if not options:
                raise UserError(f"no group size of {config.choices} divides the {width} input channels of {layer}; "
                                "add a divisor to the choices or leave the layer out of the search.")  # fmt: skip
            self.options.append(options)
        if np.mean([o[-1] for o in self.options]) < self.budget:
            raise UserError(f"min_mean_group={self.budget} cannot be met: even the largest legal group sizes average "
                            f"{np.mean([o[-1] for o in self.options]):.1f}.")  # fmt: skip

    def repair(self, genome: list[int], rng: np.random.Generator) -> Genome:
        """Enlarge random genes one choice at a time until the mean group size meets the budget."""
        while np.mean(genome) < self.budget:
            growable = [i for i, g in enumerate(genome) if g < self.options[i][-1]]
            i = growable[rng.integers(len(growable))]
            genome[i] = self.options[i][self.options[i].index(genome[i]) + 1]
        return tuple(genome)

    def uniform(self) -> Genome | None:
        """Every layer at the smallest choice >= the budget (Q-DiT's all-128 seed), if all layers allow it."""
        genome = [next((g for g in options if g >= self.budget), None) for options in self.options]
        return tuple(genome) if None not in genome and np.mean(genome) >= self.budget else None

    def random(self, rng: np.random.Generator) -> Genome:
        return self.repair([options[rng.integers(len(options))] for options in self.options], rng)

    def mutant(self, parent: Genome, p: float, rng: np.random.Generator) -> Genome:
        genes = [o[rng.integers(len(o))] if rng.random() < p else g for g, o in zip(parent, self.options)]
        return self.repair(genes, rng)

    def crossover(self, a: Genome, b: Genome, rng: np.random.Generator) -> Genome:
        return self.repair([x if rng.random() < 0.5 else y for x, y in zip(a, b)], rng)


class SearchState:
    """What a search has done so far, written to `path` (when given) after every step; `saved` is what the file
    held (read by rank 0 alone on several ranks)."""

    def __init__(self, path: Path | None, key: dict, seed: int, saved: dict | None) -> None:
        self.path, self.key, self.started = path, key, time.perf_counter()
        self.resumed = saved is not None and saved["key"] == key
        if self.resumed:
            self.generation, self.candidates, self.history = saved["generation"], saved["candidates"], saved["history"]
            self.fitness, self.earlier_seconds = saved["fitness"], saved.get("seconds", 0.0)  # none: an older state file
            self.rng = np.random.default_rng()
            self.rng.bit_generator.state = saved["rng"]
        else:  # no state, or one of another search: start afresh
            self.generation, self.candidates, self.history, self.fitness, self.earlier_seconds = 0, None, [], {}, 0.0
            self.rng = np.random.default_rng(seed)

    def seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.started

    def save(self) -> None:
        if self.path is not None:
            state = {"key": self.key, "generation": self.generation, "candidates": self.candidates, "history": self.history,
                     "fitness": self.fitness, "rng": self.rng.bit_generator.state, "seconds": self.seconds()}  # fmt: skip
            atomic_write_text(self.path, json.dumps(state))


def genome_key(genome: Genome) -> str:
    return ",".join(map(str, genome))


def ranked(fitness: dict[str, float]) -> list[Genome]:
    """Every evaluated genome, fittest first (ties broken by the genome itself, so the order is deterministic)."""
    return [tuple(map(int, key.split(","))) for key in sorted(fitness, key=lambda k: (fitness[k], k))]


def breed(space: Space, state: SearchState, config: SearchConfig) -> list[Genome]:
    """The next generation's candidates (distinct genomes)."""
    rng, candidates = state.rng, []
    if state.generation == 0:
        candidates = [g for g in (space.uniform(),) if g is not None]
    else:
        parents = ranked(state.fitness)[: config.top_k]
        for i in range(config.population):
            if i % 2 == 0:
                candidates.append(space.mutant(parents[rng.integers(len(parents))], config.mutation_p, rng))
            else:
                a, b = rng.choice(len(parents), size=2, replace=len(parents) < 2)
                candidates.append(space.crossover(parents[a], parents[b], rng))
    for _ in range(10 * config.population):  # top up with random legal genomes (a small space may have too few)
        if len(set(candidates)) >= config.population:
            break
        candidates.append(space.random(rng))
    return list(dict.fromkeys(candidates))[: config.population]


def read_state(path: Path | None) -> dict | None:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def search(widths: Mapping[str, int], fitness: Callable[[dict[str, int]], float], config: SearchConfig,
           state_path: str | Path | None = None, progress: bool = True, ranks: Ranks = SINGLE) -> SearchResult:  # fmt: skip
    """Search group sizes for the layers of `widths` (name -> input channels) minimising `fitness(group_sizes)`.
    On several ranks, each evaluates one of every N genomes still to evaluate; rank 0 alone reads and writes the state."""
    space = Space(widths, config)
    key = json.loads(json.dumps({"widths": dict(widths), "config": asdict(config)}))  # as it reads back from the file
    path = Path(state_path) if state_path else None
    saved = ranks.from_main(lambda: read_state(path), "reading the search state")
    state = SearchState(path if ranks.main else None, key, config.seed, saved)
    bar = tqdm(total=config.generations, initial=state.generation, desc="group-size search", disable=not progress)
    while state.generation < config.generations:
        if state.candidates is None:
            state.candidates = [list(g) for g in breed(space, state, config)]
            state.save()
        pending = [g for g in map(tuple, state.candidates) if genome_key(g) not in state.fitness]
        for start in range(0, len(pending), ranks.world_size):  # one genome per rank at a time, saved as they come
            genomes = pending[start : start + ranks.world_size]
            values = ranks.map(lambda g: float(fitness(dict(zip(space.layers, g)))), genomes, "the group-size search")
            state.fitness.update({genome_key(g): v for g, v in zip(genomes, values)})
            state.save()
        best = ranked(state.fitness)[0]
        state.history.append({"generation": state.generation, "best": dict(zip(space.layers, best)),
                              "fitness": state.fitness[genome_key(best)], "mean_group_size": float(np.mean(best)),
                              "evaluated": len(state.fitness)})  # fmt: skip
        state.generation, state.candidates = state.generation + 1, None
        state.save()
        bar.update()
        bar.set_postfix(best=f"{state.history[-1]['fitness']:.4g}")
    bar.close()
    best = ranked(state.fitness)[0]
    return SearchResult(dict(zip(space.layers, best)), state.fitness[genome_key(best)], state.history, len(state.fitness),
                        state.seconds(), state.resumed)  # fmt: skip
