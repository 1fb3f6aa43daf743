"""Q-DiT's group-size search: finds a known optimum, is deterministic, keeps to the budget, resumes after SIGKILL."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from dilatequant.calibrate.search import SearchConfig, search
from dilatequant.core.errors import UserError

WIDTHS = {f"blocks.{i}.{name}": width for i in range(4) for name, width in (("qkv", 192), ("proj", 64), ("fc1", 64), ("fc2", 256))}
TARGET = {layer: {"qkv": 64, "proj": 32, "fc1": 64, "fc2": 128}[layer.split(".")[-1]] for layer in WIDTHS}  # mean 72


def toy_fitness(groups: dict[str, int]) -> float:
    """Distance of every gene from TARGET in octaves (the real fitness is fid_digits of a small sample)."""
    return sum(abs(math.log2(groups[layer] / TARGET[layer])) for layer in groups)


CONFIG = SearchConfig(choices=(32, 64, 128), min_mean_group=64, population=16, top_k=4, generations=12, seed=3)


def test_the_search_finds_the_optimum_within_the_budget():
    seen = []
    result = search(WIDTHS, lambda g: seen.append(dict(g)) or toy_fitness(g), CONFIG, progress=False)
    assert result.best == TARGET and result.fitness == 0
    assert all(sum(g.values()) / len(g) >= CONFIG.min_mean_group for g in seen)  # the budget holds for every candidate
    assert all(WIDTHS[layer] % size == 0 for g in seen for layer, size in g.items())
    assert len({tuple(g.values()) for g in seen}) == len(seen) == result.evaluations  # each genome evaluated once
    fitnesses = [h["fitness"] for h in result.history]
    assert len(result.history) == CONFIG.generations and fitnesses == sorted(fitnesses, reverse=True)


def test_the_first_population_holds_the_uniform_genome_at_the_budget():
    first = []
    search(WIDTHS, lambda g: first.append(dict(g)) or 0.0, SearchConfig(min_mean_group=64, population=4, top_k=2, generations=1), progress=False)
    assert first[0] == dict.fromkeys(WIDTHS, 64) and len(first) == 4


def test_the_search_is_deterministic_under_a_seed():
    one, two = (search(WIDTHS, toy_fitness, CONFIG, progress=False) for _ in range(2))
    assert one.history == two.history and one.evaluations == two.evaluations


KILLED_RUN = """
import json, os, signal, sys
from dilatequant.calibrate.search import SearchConfig, search
sys.path.insert(0, {tests!r})
from test_search import CONFIG, WIDTHS, toy_fitness
calls = 0
def fitness(groups):
    global calls
    calls += 1
    if calls == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-search, as a kill -9 would
    return toy_fitness(groups)
search(WIDTHS, fitness, CONFIG, state_path={state!r}, progress=False)
"""


@pytest.mark.parametrize("kill_at", [3, 40])  # in the first generation, and in a later one
def test_a_search_killed_with_sigkill_resumes_to_the_same_result(tmp_path, kill_at):
    state = tmp_path / "search.json"
    code = KILLED_RUN.format(tests=os.path.dirname(__file__), kill_at=kill_at, state=str(state))
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved = json.loads(state.read_text())
    done_before = len(saved["fitness"])
    assert done_before == kill_at - 1  # every fitness known before the kill was kept
    calls = []
    resumed = search(WIDTHS, lambda g: calls.append(g) or toy_fitness(g), CONFIG, state_path=state, progress=False)
    uninterrupted = search(WIDTHS, toy_fitness, CONFIG, progress=False)
    assert resumed.history == uninterrupted.history and resumed.best == uninterrupted.best
    assert resumed.resumed and not uninterrupted.resumed
    assert resumed.seconds >= saved["seconds"] > 0  # the killed run's time counts in the search's cost
    assert len(calls) == uninterrupted.evaluations - done_before  # nothing computed twice


def test_a_state_file_of_another_search_is_not_reused(tmp_path):
    state = tmp_path / "search.json"
    search(WIDTHS, toy_fitness, SearchConfig(population=4, top_k=2, generations=2, seed=1), state_path=state, progress=False)
    calls = []
    search(WIDTHS, lambda g: calls.append(g) or 0.0, SearchConfig(population=4, top_k=2, generations=2, seed=2), state_path=state, progress=False)
    assert calls  # a different seed: evaluated afresh


def test_impossible_searches_are_refused_by_name():
    with pytest.raises(UserError, match=r"no group size of \(128,\) divides the 96 input channels of blocks.0.fc1"):
        search({"blocks.0.fc1": 96}, toy_fitness, SearchConfig(choices=(128,), min_mean_group=32), progress=False)
    with pytest.raises(UserError, match="min_mean_group=200 cannot be met"):
        search(WIDTHS, toy_fitness, SearchConfig(min_mean_group=200), progress=False)
    with pytest.raises(UserError, match="top_k"):
        SearchConfig(population=4, top_k=8)
