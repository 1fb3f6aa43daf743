"""dilatequant demo on digits with tiny settings: every stage runs, the report has its parts, a rerun resumes."""

import html
import json
import shlex

import pytest
from click.testing import CliRunner

from dilatequant.tools.arena.gallery import parse_variant
from dilatequant.tools.cli import cli
from dilatequant.tools.demo import DemoConfig, run_demo

pytest.importorskip("onnxruntime")


@pytest.mark.slow
def test_demo_writes_a_complete_report_and_resumes(tmp_path):
    config = DemoConfig(calibration={"method": "minmax", "samples": 32, "trajectories": 8, "steps": 8, "boundary": "fp"},
                        quality_n=20, sampling_steps=4, batch_size=20, threads=2)  # fmt: skip
    lines: list[str] = []
    report = run_demo(tmp_path, config, echo=lines.append)
    page = report.read_text()
    record = json.loads((tmp_path / "report.json").read_text())
    for figure in record["figures"].values():
        assert (tmp_path / figure).stat().st_size > 1000 and f'src="{figure}"' in page
    assert [t["target"].split()[0] for t in record["targets"]] == ["INT8", "class_accuracy", "fid_digits"]
    assert set(record["quality"]) == {"fp32", "int8"} and record["quality"]["int8"]["psnr_vs_fp"] > 20
    assert record["profile"]["comparisons"][0]["ratio_p50"].keys() == {"1", "8"}
    fidelity = record["fidelity"]  # the build's check of the INT8 engines against their graphs, on the page
    assert fidelity["passed"] and fidelity["integer_kernels"] in ("u8s8", "u8u8") and "The build's fidelity check passed" in page
    assert all(f"<td>{b['bucket']}</td><td>{b['samples']}</td><td>{b['end_to_end_rel_error']:.2%}</td>" in page for b in fidelity["buckets"])
    for target in record["targets"]:  # every target's measurement and verdict is on the page
        verdict = "met" if target["met"] else "MISSED"
        assert f"<td>{target['measured']}</td><td>{verdict}</td>" in page.replace("&lt;", "<").replace("&gt;", ">")
    arena = record["arena"]  # the report's arena command serves exactly the demo's variants
    assert html.escape(arena["command"]) in page and f'href="{arena["url"]}"' in page
    assert [parse_variant(f"{name}={path}").kind for name, path in arena["variants"].items()] == ["model", "calibration", "engines", "engines"]
    judged = shlex.split(arena["command"])[2:]  # the same arena, voted by a metric judge instead of served
    result = CliRunner().invoke(cli, ["arena", "judge", "--judge", "psnr", "--votes", "3", "--images", "4", *judged[1:]])
    assert result.exit_code == 0, result.output
    again: list[str] = []
    run_demo(tmp_path, config, echo=again.append)
    assert sum("reusing" in line for line in again) == 5 and not any("reusing" in line for line in lines)
