"""tools/scale.py: each stage in a fresh process with its own peak RSS, and the table it writes."""

import sys

import numpy as np
from click.testing import CliRunner

from dilatequant.tools import scale
from dilatequant.tools.scale import markdown, run_stage, stages


def test_a_stage_reports_its_own_peak_memory_exit_status_and_last_line(tmp_path):
    allocate = "import numpy as np; a = np.ones(300 * 2**20 // 8); print('done', a.sum() > 0)"
    parent = np.ones(1536 * 2**20 // 8)  # a stage spawned straight from here would count this in its ru_maxrss
    done = run_stage([sys.executable, "-c", allocate], tmp_path / "ok.log")
    assert parent.sum() > 0
    assert done["rc"] == 0 and done["last_line"] == "done True" and 0.3 <= done["peak_rss_gib"] < 0.5
    failed = run_stage([sys.executable, "-c", "raise SystemExit('no room')"], tmp_path / "fail.log")
    assert failed["rc"] == 1 and failed["last_line"] == "no room"


def test_stages_run_the_real_cli_and_the_table_names_skipped_ones(tmp_path):
    names = [stage.name for stage in stages("digits", tmp_path, 8)]
    assert names[:4] == ["calibrate", "export ort-cpu", "export tensorrt", "export fp32"] and "latency" in names
    assert all(stage.argv[1:3] == ["-m", "dilatequant.tools.cli"] for stage in stages("digits", tmp_path, 8)[:4])
    result = {"config": "digits", "model": {"parameters": 4_600_000, "fp32_weight_bytes": 18_400_000}, "latency": None,
              "stages": {"calibrate": {"seconds": 20.0, "peak_rss_gib": 0.5, "rc": 1, "last_line": "Killed"},
                         "export ort-cpu": {"skipped": "needs calibrate"}}}  # fmt: skip
    table = markdown([result], "test machine", "python -m dilatequant.tools.scale")
    assert "| digits | 4.6M | 0.02 | calibrate | 20 | 0.50 | 29.18× | exit 1: Killed |" in table
    assert "skipped (needs calibrate)" in table and "not measured" in table


def test_a_rerun_keeps_finished_stages_and_runs_the_rest(tmp_path, monkeypatch):
    ran = []

    def fake_stage(argv, log):
        ran.append(argv[3] if len(argv) > 3 else argv)
        return {"seconds": 1.0, "peak_rss_gib": 0.1, "rc": 1 if argv[3:4] == ["lint"] else 0, "last_line": "x"}

    monkeypatch.setattr(scale, "run_stage", fake_stage)
    monkeypatch.setattr(scale, "summary", lambda stage, log: None)
    first = scale.run_config("digits", tmp_path, 8)
    assert ran and all(first["stages"][name]["rc"] == (1 if name.startswith("lint") else 0) for name in first["stages"])
    ran.clear()
    second = scale.run_config("digits", tmp_path, 8)
    assert ran == ["lint"] * 3  # the failed stages run again, the others are kept
    assert second["stages"]["calibrate"]["earlier_run"] and "(an earlier run)" in scale.markdown([second], "m", "c")


def test_stages_runs_only_the_named_ones_and_refuses_unknown_names(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(scale, "run_stage", lambda argv, log: ran.append(argv[3]) or {"seconds": 1.0, "peak_rss_gib": 0.1, "rc": 0, "last_line": ""})
    monkeypatch.setattr(scale, "summary", lambda stage, log: None)
    result = scale.run_config("digits", tmp_path, 8, {"calibrate", "lint ort-cpu"})
    assert ran == ["calibrate"] and result["stages"]["lint ort-cpu"] == {"skipped": "needs export ort-cpu"}
    scale.run_config("digits", tmp_path, 8, {"calibrate"})  # named again: measured again
    assert ran == ["calibrate", "calibrate"]
    outcome = CliRunner().invoke(scale.main, ["--configs", "digits", "--work", str(tmp_path), "--out", str(tmp_path / "r"), "--stages", "calibrat"])
    assert outcome.exit_code == 2 and "unknown stage(s) ['calibrat']" in outcome.output
