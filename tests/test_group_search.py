"""Q-DiT's group-size search inside a calibration: genes per Linear input group, the artifact records the search
and rebuilds the chosen group sizes."""

import json

import pytest

from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.contract import load_artifact
from dilatequant.calibrate.flow import calibrate
from dilatequant.calibrate.groupwise import GroupWeightQuantizer
from dilatequant.core.errors import UserError

TINY = {"samples": 8, "trajectories": 8, "steps": 4, "group_choices": (4, 8, 16), "weight_group_size": 8, "group_search": True,
        "search_population": 4, "search_top_k": 2, "search_generations": 2, "search_images": 4}  # fmt: skip


def test_the_default_fitness_searches_on_sampled_images_and_the_artifact_keeps_the_result(tiny_model_dirs, tmp_path):
    config = CalibConfig.from_bits("W4A8", method="q-dit", **TINY)
    artifact = load_artifact(calibrate(tiny_model_dirs["dit"], config, tmp_path / "c", progress=False))
    searched = artifact.record.statistics["group_search"]
    assert searched["metric"] == "-psnr_vs_fp"  # the tiny DiT's samples are not digits
    assert len(searched["history"]) == 2 and searched["evaluations"] >= 4
    assert sum(searched["best"].values()) / len(searched["best"]) >= 8
    assert artifact.record.recipe["parts"]["search"] == "evolutionary-group-sizes"
    wrappers = artifact.model.denoiser.quant_layers()
    for row in artifact.quantized_layers():
        if row["group_size"]:  # the plan and the rebuilt quantizers hold the searched size of the row's input group
            assert row["group_size"] == searched["best"][row["group"]]
            assert isinstance(wrappers[row["layer"]].weight_quantizer, GroupWeightQuantizer)
            assert wrappers[row["layer"]].weight_quantizer.group_size == row["group_size"]
            assert wrappers[row["layer"]].input_quantizer.group_size == row["group_size"]


def test_a_callers_fitness_decides(tiny_model_dirs, tmp_path):
    """Fitness: prefer large groups (fewer scales). The search must beat its uniform seed (every group at the budget,
    8) and keep its best-so-far monotone."""
    def fitness(model) -> float:
        sizes = [w.weight_quantizer.group_size for w in model.quant_layers().values() if isinstance(w.weight_quantizer, GroupWeightQuantizer)]
        return -sum(sizes)

    config = CalibConfig.from_bits("W4A8", method="q-dit", **{**TINY, "search_generations": 4, "search_population": 8})
    artifact = load_artifact(calibrate(tiny_model_dirs["dit"], config, tmp_path / "c", progress=False, fitness=fitness))
    searched = artifact.record.statistics["group_search"]
    assert searched["metric"] == "caller's fitness"
    fitnesses = [h["fitness"] for h in searched["history"]]
    layers = [row for row in json.loads((tmp_path / "c" / "quant_plan.json").read_text())["layers"] if row["group_size"]]
    assert fitnesses == sorted(fitnesses, reverse=True) and fitnesses[-1] < -8 * len(layers)  # better than the seed
    assert searched["fitness"] == -sum(row["group_size"] for row in layers)  # the plan holds the best genome


def test_search_settings_that_would_not_run_are_refused():
    with pytest.raises(UserError, match="weight_group_size .e.g. 128., the budget"):
        CalibConfig(method="dilatequant", group_search=True)
    with pytest.raises(UserError, match="must be >= 1"):
        CalibConfig(method="q-dit", group_search=True, search_images=0)
    with pytest.raises(UserError, match="search_top_k=5 parents must come from search_population=3"):
        CalibConfig(method="q-dit", group_search=True, search_population=3)  # refused before any work, not mid-run
