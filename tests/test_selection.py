"""Calibration-data selection (calibrate/selection.py): random, uniform and EDA-DM's TDAC."""

import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilatequant.calibrate.calib_data import CalibrationData
from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.calibrate.selection import Pool, select_tdac, tdac_counts, tdac_scores
from dilatequant.core.errors import UserError


def features(steps: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(steps, 4, 8, 3, 3, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.floats(0, 10), min_size=1, max_size=60), samples=st.integers(1, 2000))
def test_tdac_counts_sum_to_n_and_follow_the_weights(weights, samples):
    w = torch.tensor(weights, dtype=torch.float64)
    counts = tdac_counts(w, samples)
    assert int(counts.sum()) == samples and bool((counts >= 0).all())
    if w.sum() > 0:  # within rounding (plus the fixed remainder) of the proportional share
        assert (counts - samples * w / w.sum()).abs().max() <= 1 + abs(samples - (samples * w / w.sum()).round().sum())


def test_tdac_samples_come_from_distinct_trajectories_and_are_deterministic():
    pool = Pool(40, [900, 700, 500, 300, 100, 0], features())
    a = select_tdac(pool, 40, torch.Generator().manual_seed(3))
    b = select_tdac(pool, 40, torch.Generator().manual_seed(3))
    assert len(set(a.trajectory.tolist())) == 40 and torch.equal(a.trajectory, b.trajectory) and torch.equal(a.step, b.step)
    assert sum(a.record["counts"]) == 40 and a.record["counts"] == torch.bincount(a.step, minlength=6).tolist()
    assert a.record["timesteps"] == pool.timesteps and a.record["mode"] == "tdac"


def test_a_timestep_with_duplicated_features_is_denser():
    f = features(5) * 10  # far apart: no step within the radius of another
    f[3] = f[1]  # step 3 repeats step 1
    density, _ = tdac_scores(f, radius=1.0)
    assert density[1] == density[3] == 1 and density[[0, 2, 4]].eq(0).all()


def test_tdac_diversity_is_the_summed_channel_cosine_distance():
    f = torch.zeros(3, 1, 2, 1, 1)  # 3 steps, one sample, 2 channels, one position
    f[0, 0, :, 0, 0] = torch.tensor([1.0, 0.0])
    f[1, 0, :, 0, 0] = torch.tensor([0.0, 1.0])  # cos 0 with step 0
    f[2, 0, :, 0, 0] = torch.tensor([1.0, 1.0])  # cos 1/sqrt(2) with both
    _, diversity = tdac_scores(f, radius=1e-9)
    raw = torch.tensor([1 + (1 - 2**-0.5), 1 + (1 - 2**-0.5), 2 * (1 - 2**-0.5)], dtype=torch.float64)
    assert torch.allclose(diversity, (raw - raw.min()) / (raw.max() - raw.min()))
    tokens = f.permute(0, 1, 3, 4, 2).reshape(3, 1, 1, 2)  # DiT layout (steps, B, tokens, C): the same cosine
    assert torch.allclose(tdac_scores(tokens, radius=1e-9)[1], diversity)


def test_tdac_needs_a_trajectory_per_sample():
    with pytest.raises(UserError, match="tdac' takes every sample from its own trajectory: samples=64 needs trajectories >= 64"):
        CalibConfig(timestep_sampling="tdac", samples=64, trajectories=16)


def test_selection_record_survives_the_round_trip(tmp_path):
    data = CalibrationData(torch.zeros(2, 1, 2, 2), torch.tensor([5, 1]), torch.tensor([0, 1]), {"mode": "tdac", "counts": [1, 1]})
    (tmp_path / "d.safetensors").write_bytes(data.to_bytes())
    assert CalibrationData.load(tmp_path / "d.safetensors").selection == {"mode": "tdac", "counts": [1, 1]}


@pytest.mark.parametrize("family", ["unet", "unet-cond", "dit"])
def test_tdac_calibrates_every_family_and_records_its_counts(tiny_model_dirs, tmp_path, family):
    config = CalibConfig(method="minmax", timestep_sampling="tdac", samples=12, trajectories=12, steps=4)
    path = calibrate(tiny_model_dirs[family], config, tmp_path / "c", progress=False)
    record = json.loads((path / "calibration.json").read_text())
    selection = record["statistics"]["data_selection"]
    assert selection["mode"] == "tdac" and sum(selection["counts"]) == 12 and len(selection["density"]) == 4
    assert selection["timesteps"] == record["timesteps"] and record["recipe"]["parts"]["selector"] == "tdac"
    from click.testing import CliRunner

    from dilatequant.tools.calibration_report import main

    result = CliRunner().invoke(main, ["selection", "--calib", str(path), "--out", str(tmp_path / "tdac.png")])
    assert result.exit_code == 0 and "tdac: 12 samples over 4 timesteps" in result.output, result.output
    assert (tmp_path / "tdac.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_radius_outside_the_features_spread_is_warned_about_and_the_spread_recorded():
    pool = Pool(40, [900, 700, 500, 300, 100, 0], features())
    with pytest.warns(UserWarning, match="above every pairwise feature MSE"):
        chosen = select_tdac(pool, 40, torch.Generator().manual_seed(0), radius=100.0)
    spread = chosen.record["pairwise_mse"]
    assert 0 < spread["min"] <= spread["median"] <= spread["max"] < 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a radius inside the spread: no warning
        select_tdac(pool, 40, torch.Generator().manual_seed(0), radius=spread["median"])
