"""The calibration results script keeps working: a minimal run, then the rendered page and plot."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from dilatequant.calibrate.recipes import RECIPES
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
    assert all("phase_seconds" in r and r["recipe"] for r in recorded["rows"][1:])  # what each calibration measured


def test_merge_keeps_every_row_and_a_later_file_wins(tmp_path):
    def rows_file(name: str, rows: list[tuple[str, str, float]]):
        path = tmp_path / name
        path.write_text(json.dumps({"rows": [{"bits": b, "variant": v, "fid_digits": f} for b, v, f in rows], "ranges": {}}))
        return str(path)

    first = rows_file("a.json", [("FP", "FP", 2.5), ("W4A4", "EDA-DM", 50.0)])
    second = rows_file("b.json", [("FP", "FP", 2.5), ("W4A4", "EDA-DM", 40.0), ("W4A4", "DilateQuant + TDAC", 9.0)])
    out = tmp_path / "merged.json"
    result = CliRunner().invoke(calibration_report.main, ["merge", "--rows", first, "--rows", second, "--out", str(out)])
    assert result.exit_code == 0, result.output
    merged = {(r["bits"], r["variant"]): r["fid_digits"] for r in json.loads(out.read_text())["rows"]}
    assert merged == {("FP", "FP"): 2.5, ("W4A4", "EDA-DM"): 40.0, ("W4A4", "DilateQuant + TDAC"): 9.0}


def test_an_unknown_variant_is_refused_by_name(tmp_path):
    args = ["run", "--variants", "DilateQuant (TPQ+WD+BKD)", "--rows", str(tmp_path / "rows.json")]
    result = CliRunner().invoke(calibration_report.main, args)
    assert result.exit_code != 0 and "unknown variants" in result.output and "DilateQuant v1 (old defaults)" in result.output


def test_a_reference_file_is_written_once_then_read_and_checked(tmp_path, monkeypatch):
    path = tmp_path / "fp.pt"
    args = ["reference", "--n", "2", "--steps", "2", "--device", "cpu", "--out", str(path)]
    assert CliRunner().invoke(calibration_report.main, args, catch_exceptions=False).exit_code == 0
    rows = tmp_path / "rows.json"
    run = ["run", "--bits", "W8A8", "--variants", "naive min-max", "--n", "2", "--steps", "2", "--samples", "4",
           "--trajectories", "2", "--device", "cpu", "--work", str(tmp_path / "work"), "--rows", str(rows), "--reference", str(path)]  # fmt: skip
    sampled = []
    real_sample = calibration_report.sample
    monkeypatch.setattr(calibration_report, "sample", lambda denoiser, *a, **k: sampled.append(denoiser) or real_sample(denoiser, *a, **k))
    result = CliRunner().invoke(calibration_report.main, run, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(sampled) == 1  # only the quantized row's images: the FP ones were read from the file
    other = [*run[:6], "4", *run[7:-3], str(tmp_path / "other.json"), *run[-2:]]  # n = 4 on a fresh rows file
    mismatch = CliRunner().invoke(calibration_report.main, other)
    assert mismatch.exit_code != 0 and "holds FP images of" in mismatch.output


def test_a_finished_artifact_is_reused_and_overrides_are_recorded(tmp_path, monkeypatch):
    """A run stopped during its evaluation resumes without calibrating again; a variant's overrides reach its config."""
    rows, work = tmp_path / "rows.json", tmp_path / "work"
    args = ["run", "--bits", "W8A8", "--variants", "EDA-DM at 2000 iterations", "--n", "2", "--steps", "2", "--samples", "4",
            "--trajectories", "4", "--bkd-iters", "1", "--device", "cpu", "--work", str(work), "--rows", str(rows)]  # fmt: skip
    assert CliRunner().invoke(calibration_report.main, args, catch_exceptions=False).exit_code == 0
    first = json.loads(rows.read_text())["rows"][-1]
    assert first["recipe"] == "eda-dm" and first["overrides"] == {"bkd_iters": 2000} and first["bkd_iters"] == 1  # --bkd-iters wins
    rows.unlink()  # as if the process had been killed before writing the row

    import dilatequant.calibrate.flow as flow

    monkeypatch.setattr(flow, "calibrate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recalibrated")))
    assert CliRunner().invoke(calibration_report.main, args, catch_exceptions=False).exit_code == 0
    again = json.loads(rows.read_text())["rows"][-1]
    assert again["fid_digits"] == first["fid_digits"] and again["phase_seconds"] == first["phase_seconds"]
    assert not list(work.glob("*.samples-*"))  # a row's sampling checkpoint goes once the row is written
    rows.unlink()
    changed = [a if i != args.index("--bkd-iters") + 1 else "2" for i, a in enumerate(args)]  # another configuration
    with pytest.raises(AssertionError, match="recalibrated"):
        CliRunner().invoke(calibration_report.main, changed, catch_exceptions=False)


def test_every_variant_can_be_named_on_the_command_line():
    """--variants is comma-separated: a comma inside a name would make that row unreachable."""
    from dilatequant.calibrate.recipes import recipe

    assert not [name for name in calibration_report.VARIANTS if "," in name]
    for name, overrides in calibration_report.VARIANTS.values():  # a known recipe, overrides that are config fields
        config = recipe(name, "W4A4", **overrides)
        assert all(getattr(config, field) == value for field, value in overrides.items())


@pytest.mark.slow
def test_q_dit_rows_run_on_the_bundled_dit(tmp_path):
    """docs/results/dit.md's rows: the same script with --model digits-dit and Q-DiT's ablation variants."""
    rows = tmp_path / "rows.json"
    variants = "Q-DiT groups of 128 with static activations,Q-DiT groups of 128 + dynamic activations"
    args = ["run", "--model", "digits-dit", "--bits", "W4A8", "--variants", variants, "--n", "4", "--steps", "2",
            "--samples", "8", "--trajectories", "4", "--device", "cpu", "--work", str(tmp_path / "work"), "--rows", str(rows)]  # fmt: skip
    result = CliRunner().invoke(calibration_report.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    recorded = json.loads(rows.read_text())["rows"]
    assert [(r["model"], r["variant"]) for r in recorded] == [("digits-dit", "FP"), *[("digits-dit", v) for v in variants.split(",")]]
    assert [r["recipe"] for r in recorded[1:]] == ["q-dit", "q-dit"] and recorded[1]["overrides"] == {"act_dynamic": False}
    # v2 keeps the boundary layers in FP: a row says which meaning of the recipe it measured
    assert [r["recipe_version"] for r in recorded[1:]] == [RECIPES["q-dit"].version] * 2 == [2, 2]


def test_the_device_job_files_name_known_rows():
    """A misspelt variant in a job file would only fail on the GPU machine, after its start-up and device time."""
    import re
    from pathlib import Path

    jobs = sorted((Path(__file__).parent.parent / "tools" / "device").glob("*.jobs"))
    named = [(f.name, v) for f in jobs for line in f.read_text().splitlines() if not line.startswith("#")
             for _bits, variants in re.findall(r'table_row\.sh (\S+) "([^"]+)"', line) for v in variants.split(",")]  # fmt: skip
    assert len(named) >= 13  # the DiT rows file alone names 13
    assert [(f, v) for f, v in named if v not in calibration_report.VARIANTS] == []
