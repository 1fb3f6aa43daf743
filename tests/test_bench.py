"""tools/bench --quick: every entry is deployed, sampled, profiled and tabled (keeps the benchmark script working)."""

import json

import pytest
from click.testing import CliRunner

from dilatequant.tools.bench import main
from dilatequant.tools.peers import MODELOPT_VARIANTS, ORT_VARIANTS

pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt")


@pytest.mark.slow
def test_quick_bench_covers_every_entry(tmp_path):
    run = CliRunner().invoke(main, ["--out", str(tmp_path), "--quick"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["rows"]
    expected = {"fp32", "dilatequant-w8a8-k1", "dilatequant-w8a8-k4", "dilatequant-w8a8-nowd-k4", "dilatequant-w4a8-k4",
                *ORT_VARIANTS, *MODELOPT_VARIANTS}  # fmt: skip
    assert set(rows) == expected
    assert rows["fp32"]["psnr_vs_fp"] is None and all(r["psnr_vs_fp"] > 15 for n, r in rows.items() if n != "fp32")
    assert rows["dilatequant-w8a8-k4"]["graphs"] == 4 and rows["ort-minmax-int8"]["graphs"] == 1
    assert all(r["p50_ms_batch8"] > r["p50_ms_batch1"] > 0 and r["bytes_on_disk"] > 0 for r in rows.values())
    assert all(rows[name]["calibration_seconds"] > 0 for name in expected - {"fp32"})
    assert (tmp_path / "bench.png").stat().st_size > 1000 and "| dilatequant-w8a8-k4 | 4 |" in (tmp_path / "bench.md").read_text()
