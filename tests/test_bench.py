"""tools/bench --quick: every entry is deployed, sampled, profiled and tabled (keeps the benchmark script working);
the torch-backend variant, entry subsets and merging split runs."""

import json
from dataclasses import asdict

import pytest
import torch
from click.testing import CliRunner

from dilatequant.core.denoiser import load_model
from dilatequant.core.errors import UserError
from dilatequant.export.flow import export_unquantized
from dilatequant.tools.bench import BenchConfig, main, merge_reports
from dilatequant.tools.peers import PEERS, boundary_layers, modelopt_quantize, ort_quantize

pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt")


@pytest.mark.slow
def test_quick_bench_covers_every_entry(tmp_path):
    run = CliRunner().invoke(main, ["--out", str(tmp_path), "--quick"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["rows"]
    expected = {"fp32", "dilatequant-w8a8-k1", "dilatequant-w8a8-k4", "dilatequant-w8a8-nowd-k4", "dilatequant-w4a8-k4",
                "q-dit-w4a8-dynamic-k4", *PEERS}  # fmt: skip
    assert {"ort-percentile-uint8-fp-boundary", "modelopt-int8-fp-boundary", "ort-dynamic-int8"} <= expected
    assert set(rows) == expected
    assert rows["fp32"]["psnr_vs_fp"] is None and all(r["psnr_vs_fp"] > 15 for n, r in rows.items() if n != "fp32")
    assert rows["dilatequant-w8a8-k4"]["graphs"] == 4 and rows["ort-minmax-int8"]["graphs"] == 1
    assert all(r["p50_ms_batch8"] > r["p50_ms_batch1"] > 0 and r["bytes_on_disk"] > 0 for r in rows.values())
    assert all(rows[name]["calibration_seconds"] > 0 for name in expected - {"fp32"})
    # every entry's engines were checked against their graphs; FP32 has no quantized layer to check
    assert rows["fp32"]["worst_layer_vs_graph"] is None and rows["fp32"]["end_to_end_vs_graph"] < 1e-4
    assert all(r["worst_layer_vs_graph"] < 1e-2 for n, r in rows.items() if n.startswith(("dilatequant", "q-dit")))
    assert (tmp_path / "bench.png").stat().st_size > 1000 and "| dilatequant-w8a8-k4 | 4 |" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_quick_bench_on_the_torch_backend_measures_quality_of_a_subset(tmp_path):
    run = CliRunner().invoke(main, ["--out", str(tmp_path), "--quick", "--backend", "torch", "--entries", "ort-minmax-uint8"],
                             catch_exceptions=False)  # fmt: skip
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["rows"]
    assert set(rows) == {"fp32", "ort-minmax-uint8"} and rows["ort-minmax-uint8"]["psnr_vs_fp"] > 15
    assert all(r["p50_ms_batch1"] is None and r["p50_ms_batch8"] is None for r in rows.values())  # no latency from a reference executor
    engines = json.loads((tmp_path / "work" / "engines-ort-minmax-uint8" / "manifest.json").read_text())
    assert engines["backend"] == "torch" and not (tmp_path / "bench.png").exists()
    assert "| ort-minmax-uint8 | 1 |" in (tmp_path / "bench.md").read_text() and "| — | — |" in (tmp_path / "bench.md").read_text()


def fake_report(entries: list[str], fp32_fid: float = 3.0) -> dict:
    row = {"fid_digits": 3.1, "class_accuracy": 0.99, "psnr_vs_fp": 40.0, "p50_ms_batch1": None, "p50_ms_batch8": None,
           "calibration_seconds": 1.0, "bytes_on_disk": 1, "graphs": 1}  # fmt: skip
    config = {**asdict(BenchConfig(backend="torch", n=5000)), "entries": entries}
    return {"config": config, "device": "cuda (GPU)", "versions": {},
            "rows": {"fp32": {**row, "fid_digits": fp32_fid, "psnr_vs_fp": None}, **{name: row for name in entries}}}  # fmt: skip


def test_runs_split_by_entries_merge_into_one_table_in_entry_order(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(fake_report(["modelopt-int8"])))
    second.write_text(json.dumps(fake_report(["dilatequant-w8a8-k4"])))
    run = CliRunner().invoke(main, ["--out", str(tmp_path / "m"), "--merge", str(first), "--merge", str(second)], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    merged = json.loads((tmp_path / "m" / "bench.json").read_text())
    assert list(merged["rows"]) == ["fp32", "dilatequant-w8a8-k4", "modelopt-int8"] and merged["merged_runs"] == 2


def test_merge_refuses_runs_whose_references_or_settings_differ():
    with pytest.raises(UserError, match="FP32 rows differ"):
        merge_reports([fake_report(["modelopt-int8"]), fake_report(["dilatequant-w8a8-k4"], fp32_fid=3.5)])
    other = fake_report(["dilatequant-w8a8-k4"])
    other["config"]["n"] = 1000
    with pytest.raises(UserError, match="differ in --entries alone"):
        merge_reports([fake_report(["modelopt-int8"]), other])
    with pytest.raises(UserError, match="Unknown bench entries nope; choose from fp32, dilatequant-w8a8-k1"):
        BenchConfig(entries=("nope",))


def test_the_fp_boundary_dynamic_peer_leaves_a_dits_boundary_linears_in_float(tiny_model_dirs, tmp_path):
    """ort-dynamic-linear-int8-fp-boundary: the per-block timestep/label embedders and the final Linears stay float
    MatMul/Gemm, as in dilatequant's and Q-DiT's graphs; without the exclusion every one of them is quantized."""
    from dilatequant.tools.peers import ort_quantize_dynamic

    loaded = load_model(tiny_model_dirs["dit"])
    linears = {layer for layer in boundary_layers(loaded) if "pos_embed" not in layer}  # the patch embedder is a Conv
    assert any("timestep_embedder" in layer for layer in linears) and "proj_out_2" in linears
    graph = export_unquantized(tiny_model_dirs["dit"], "fp32", tmp_path / "fp") / "bucket_0.onnx"
    # a Gemm comes back as MatMul '<name>_MatMul' + Add (quantize_dynamic splits Gemms before quantizing)
    float_linears = lambda model: {n.name.removesuffix("_MatMul") for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}  # noqa: E731
    assert linears <= float_linears(ort_quantize_dynamic(graph, ("MatMul", "Gemm"), boundary_layers(loaded)))
    assert not linears & float_linears(ort_quantize_dynamic(graph, ("MatMul", "Gemm"), []))


def fp_input_layers(model) -> set[str]:
    """Names of the Conv/Gemm/MatMul nodes of a Q/DQ graph whose activation input is not dequantized."""
    producers = {output: node for node in model.graph.node for output in node.output}
    return {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
            and not (n.input[0] in producers and producers[n.input[0]].op_type == "DequantizeLinear")}  # fmt: skip


def test_fp_boundary_peers_leave_exactly_dilatequants_boundary_layers_unquantized(tiny_model_dirs, tmp_path):
    loaded = load_model(tiny_model_dirs["unet-cond"])
    boundary = boundary_layers(loaded)
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= set(boundary)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, *loaded.denoiser.sample_shape, generator=generator)
    batches = [(x, torch.full((4,), 500), loaded.denoiser.conditioning(torch.arange(4) % 4))]
    graph = export_unquantized(tiny_model_dirs["unet-cond"], "fp32", tmp_path / "fp") / "bucket_0.onnx"
    assert fp_input_layers(ort_quantize(graph, batches, "MinMax", "QUInt8", boundary)) == set(boundary)
    assert fp_input_layers(ort_quantize(graph, batches, "MinMax", "QUInt8", [])) == set()
    modelopt = fp_input_layers(modelopt_quantize(loaded, batches, "INT8_DEFAULT_CFG", boundary))
    assert {f"/denoiser/model/{layer.replace('.', '/')}/{'Conv' if 'conv' in layer else 'Gemm'}" for layer in boundary} <= modelopt
