"""The calibration results script keeps working: a minimal run, then the rendered page and plot."""

import json

from click.testing import CliRunner
from PIL import Image

from dilatequant.tools import calibration_report


def test_run_then_render(tmp_path):
    rows = tmp_path / "rows.json"
    args = ["run", "--bits", "W8A8", "--variants", "naive min-max,+TPQ", "--n", "4", "--steps", "2", "--samples", "8",
            "--trajectories", "4", "--device", "cpu", "--work", str(tmp_path / "work"), "--rows", str(rows)]  # fmt: skip
    result = CliRunner().invoke(calibration_report.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    recorded = json.loads(rows.read_text())
    assert [(r["bits"], r["variant"]) for r in recorded["rows"]] == [("FP", "FP"), ("W8A8", "naive min-max"), ("W8A8", "+TPQ")]
    assert set(recorded["ranges"]) == {"naive min-max", "+TPQ"}
    again = CliRunner().invoke(calibration_report.main, args, catch_exceptions=False)  # everything is done: no new rows
    assert len(json.loads(rows.read_text())["rows"]) == 3 and "already in" in again.output

    out = tmp_path / "page"
    out.mkdir()
    render = ["render", "--rows", str(rows), "--out", str(out), "--floor", str(tmp_path / "none.json"),
              "--memory", str(tmp_path / "none.json"), "--notes", str(tmp_path / "none.md")]  # fmt: skip
    assert CliRunner().invoke(calibration_report.main, render, catch_exceptions=False).exit_code == 0
    page = (out / "calibration.md").read_text()
    assert "| W8A8 | naive min-max |" in page and "| W8A8 | +TPQ |" in page
    assert Image.open(out / "calibration_act_ranges.png").format == "PNG"
