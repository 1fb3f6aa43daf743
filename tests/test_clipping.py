"""The clipping study (tools/clipping.py): the error split adds up, and the command runs on a tiny model."""

import json

import torch
from click.testing import CliRunner

from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.calibrate.quantizer import ActQuantizer
from dilatequant.calibrate.timesteps import TimestepIndex
from dilatequant.tools import clipping


def test_the_split_is_clipping_beyond_the_range_plus_rounding_inside_it():
    index = TimestepIndex(torch.tensor([0, 500]))
    quantizer = ActQuantizer(index, 2, 8, True, channel_dim=1)
    with torch.no_grad():
        quantizer.step.copy_(torch.tensor([0.01, 0.1]))  # ranges ±1.27 and ±12.7
    quantizer.enabled = True
    x = torch.tensor([[[0.5, 2.0, -3.0]], [[0.5, 2.0, -3.0]]])  # sample 0 at t=0 (row 0), sample 1 at t=500 (row 1)
    index.set_timesteps(torch.tensor([0, 500]))
    split = clipping.ErrorSplit(2)
    split.observe(quantizer, x)
    assert split.clipped.tolist() == [2, 0] and split.seen.tolist() == [3, 3]
    assert torch.allclose(split.clip_error, torch.tensor([(2 - 1.27) ** 2 + (3 - 1.28) ** 2, 0.0], dtype=torch.float64))
    total = (quantizer(x) - x).pow(2).flatten(1).sum(1).double()
    assert torch.allclose(split.clip_error + split.round_error, total)


def test_the_command_compares_calibrations(tiny_model_dirs, tmp_path):
    calib = calibrate(tiny_model_dirs["unet"], CalibConfig(method="minmax", tpq=False, samples=8, trajectories=4, steps=4), tmp_path / "c",
                      progress=False)  # fmt: skip
    out = tmp_path / "clipping.json"
    args = ["--calib", str(calib), "--n", "4", "--steps", "4", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(clipping.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (record,) = json.loads(out.read_text())["results"]
    assert record["tables"] == "one shared range" and record["round_error"] > 0 and 0 <= record["clipped_share"] < 1
    # a shared table's error still lands on each sample's own timestep
    assert len(record["per_timestep"]["clip_error"]) == 4 and all(e > 0 for e in record["per_timestep"]["round_error"])
