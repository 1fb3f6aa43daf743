"""tools/scale.py: each stage in a fresh process with its own peak RSS, and the table it writes."""

import sys

import numpy as np

from dilatequant.tools.scale import markdown, run_stage, stages


def test_a_stage_reports_its_own_peak_memory_exit_status_and_last_line(tmp_path):
    allocate = "import numpy as np; a = np.ones(300 * 2**20 // 8); print('done', a.sum() > 0)"
    parent = np.ones(1536 * 2**20 // 8)  # a stage spawned straight from here would count this in its ru_maxrss
    done = run_stage([sys.executable, "-c", allocate], tmp_path / "ok.log")
    assert parent.sum() > 0
    assert done["rc"] == 0 and done["last_line"] == "done True" and 0.3 <= done["peak_rss_gb"] < 0.5
    failed = run_stage([sys.executable, "-c", "raise SystemExit('no room')"], tmp_path / "fail.log")
    assert failed["rc"] == 1 and failed["last_line"] == "no room"


def test_stages_run_the_real_cli_and_the_table_names_skipped_ones(tmp_path):
    names = [stage.name for stage in stages("digits", tmp_path, 8)]
    assert names[:4] == ["calibrate", "export ort-cpu", "export tensorrt", "export fp32"] and "latency" in names
    assert all(stage.argv[1:3] == ["-m", "dilatequant.tools.cli"] for stage in stages("digits", tmp_path, 8)[:4])
    result = {"config": "digits", "model": {"parameters": 4_600_000, "fp32_weight_bytes": 18_400_000}, "latency": None,
              "stages": {"calibrate": {"seconds": 20.0, "peak_rss_gb": 0.5, "rc": 1, "last_line": "Killed"},
                         "export ort-cpu": {"skipped": "needs calibrate"}}}  # fmt: skip
    table = markdown([result], "test machine", "python -m dilatequant.tools.scale")
    assert "| digits | 4.6M | 0.02 | calibrate | 20 | 0.50 | 29.18× | exit 1: Killed |" in table
    assert "skipped (needs calibrate)" in table and "not measured" in table
