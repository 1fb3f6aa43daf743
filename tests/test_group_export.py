"""Group-wise artifacts deployed: Q-DiT (group-wise weights, dynamic activations) to ONNX Runtime as MatMulNBits
(ort-dynamic), its TensorRT form (symmetric groups, static tables) as block-quantized DequantizeLinear (tensorrt),
and refused by name where a profile cannot run them."""

import json

import numpy as np
import onnx
import pytest
import torch

from dilatequant.calibrate.artifact import load_artifact
from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.calibrate.rebucket import bucketed_model
from dilatequant.core.buckets import BucketTable
from dilatequant.core.errors import UserError
from dilatequant.export.config import ExportConfig
from dilatequant.export.flow import export
from dilatequant.export.lint import ort_fusion

ort = pytest.importorskip("onnxruntime")
TINY = {"samples": 16, "trajectories": 8, "steps": 4}


@pytest.fixture(scope="module")
def q_dit(tiny_model_dirs, tmp_path_factory):
    """W4A8 q-dit on the tiny DiT in groups of 16 (ONNX Runtime's smallest block), and its ort-dynamic export."""
    root = tmp_path_factory.mktemp("ort-dynamic")
    calib = calibrate(tiny_model_dirs["dit"], CalibConfig.from_bits("W4A8", method="q-dit", weight_group_size=16, **TINY),
                      root / "calib", progress=False)  # fmt: skip
    return calib, export(calib, ExportConfig(buckets=2, profile="ort-dynamic"), root / "export")


def test_group_wise_layers_become_matmul_nbits_with_integer_inputs(q_dit):
    calib, out = q_dit
    artifact = load_artifact(calib)
    grouped = {row["layer"]: row for row in artifact.quantized_layers() if row.get("group_size")}
    graph = onnx.load(str(out / "bucket_0.onnx"), load_external_data=False)
    nbits = {n.name: {a.name: a.i for a in n.attribute} for n in graph.graph.node if n.op_type == "MatMulNBits"}
    assert set(nbits) == set(grouped) and grouped
    for layer, attrs in nbits.items():
        assert attrs["bits"] == 4 and attrs["block_size"] == 16 and attrs["accuracy_level"] == 4
        assert attrs["N"] * attrs["K"] == np.prod(artifact.weight_step(layer).shape) * 16
    dequantized_weights = {n.input[0] for n in graph.graph.node if n.op_type == "DequantizeLinear"}
    assert not any(name.startswith(tuple(grouped)) for name in dequantized_weights)  # no float copy of a group weight
    assert any(o.domain == "com.microsoft" for o in graph.opset_import)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == ExportConfig().opset  # no blocked DQ
    report = ort_fusion(out / "bucket_0.onnx")
    assert report["matmul_nbits"] == {"nodes": len(grouped), "integer_inputs": len(grouped)}


def run_onnx_runtime(path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run a graph on ONNX Runtime, feeding each float input in the graph's precision (FP16 graphs take FP16)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in session.get_inputs()}
    return session.run(None, {k: v.astype(np.float16) if types[k] == "tensor(float16)" else v for k, v in feeds.items()})[0]


def deployed_against_fake_quant(calib, out, run=None) -> list[tuple[float, float]]:
    """Per bucket, on the check inputs: (relative distance of the deployed graph from the torch fake-quant model with
    the same bucket rows, relative distance of the FP model from it). `run(path, feeds)` runs a graph (ONNX Runtime
    by default)."""
    artifact = load_artifact(calib)
    manifest = json.loads((out / "manifest.json").read_text())
    table = BucketTable.from_dict(manifest["buckets"])
    model = bucketed_model(artifact, table, quantized_outputs=frozenset(manifest["quantized_outputs"])).denoiser
    fp = artifact.model.denoiser
    data = artifact.calibration_data()
    run = run or run_onnx_runtime
    errors = []
    for k in range(len(table)):
        chosen = torch.tensor([table.bucket_of(float(t)) == k for t in data.t])
        x, t, labels = (v[chosen][:4] for v in (data.x, data.t, data.labels))
        cond = model.conditioning(labels)
        got = run(out / f"bucket_{k}.onnx", {"x": x.numpy(), "t": t.numpy(), "cond": cond.numpy()}).astype(np.float32)
        with torch.no_grad():
            expected = model(x, t, cond).numpy()
            fp.set_quantization(activations=False, weights=False)
            unquantized = fp(x, t, cond).numpy()
            fp.set_quantization(activations=True, weights=True)
        scale = np.linalg.norm(expected)
        errors.append((np.linalg.norm(got - expected) / scale, np.linalg.norm(unquantized - expected) / scale))
    return errors


def test_onnx_runtime_follows_the_fake_quantized_model_in_every_bucket(q_dit):
    """The group-wise layers compute the same integers (test_matmul_nbits.py); what differs is the static boundary
    layers' fused requantization and float summation order."""
    for deployed, quantization in deployed_against_fake_quant(*q_dit):
        assert deployed < 0.25 * quantization, (deployed, quantization)


@pytest.fixture(scope="module")
def q_dit_tensorrt(tiny_model_dirs, tmp_path_factory):
    """W4A8 q-dit-tensorrt on the tiny DiT in groups of 8, exported to the tensorrt profile in FP32 and FP16."""
    from dilatequant.calibrate.recipes import recipe

    root = tmp_path_factory.mktemp("blocked")
    config = recipe("q-dit-tensorrt", "W4A8", weight_group_size=8, **TINY)
    calib = calibrate(tiny_model_dirs["dit"], config, root / "calib", progress=False)
    return calib, {fp32: export(calib, ExportConfig(buckets=2, fp32=fp32), root / f"export-{fp32}") for fp32 in (True, False)}


def test_tensorrt_graphs_store_group_weights_as_int4_blocks_and_lint_clean(q_dit_tensorrt):
    from dilatequant.export.lint import lint_tensorrt

    calib, exports = q_dit_tensorrt
    artifact = load_artifact(calib)
    grouped = {row["layer"] for row in artifact.quantized_layers() if row.get("group_size")}
    assert grouped and artifact.config.weight_group_symmetric and not artifact.config.act_dynamic
    for out in exports.values():
        graph = onnx.load(str(out / "bucket_0.onnx"))
        # Q-DiT leaves the per-block timestep embedders in FP, so no two tables quantize their shared input
        assert lint_tensorrt(graph) == []
        assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 21
        initializers = {i.name: i for i in graph.graph.initializer}
        producers = {name: n for n in graph.graph.node for name in n.output}
        for node in graph.graph.node:
            if node.name in grouped:
                dq = producers[node.input[1]]
                attrs = {a.name: a.i for a in dq.attribute}
                assert dq.op_type == "DequantizeLinear" and attrs["block_size"] == 8 and len(dq.input) == 2  # zero point 0
                assert initializers[dq.input[0]].data_type == onnx.TensorProto.INT4
                assert len(initializers[dq.input[1]].dims) == 2


def test_tensorrt_graphs_follow_the_fake_quantized_model_in_onnx_runtime_and_the_torch_executor(q_dit_tensorrt):
    """The blocked weights dequantize to the fake quantizer's values: FP32 graphs follow the torch model within float
    and requantization noise, on ONNX Runtime and on the torch executor (the GPU quality runs' backend)."""
    from dilatequant.engines.torch_graph import TorchGraph

    calib, exports = q_dit_tensorrt
    executor = lambda path, feeds: TorchGraph(path)(**{k: torch.from_numpy(v) for k, v in feeds.items()}).float().numpy()  # noqa: E731
    for run in (None, executor):
        for deployed, quantization in deployed_against_fake_quant(calib, exports[True], run):
            assert deployed < 0.25 * quantization, (deployed, quantization)
    for deployed, quantization in deployed_against_fake_quant(calib, exports[False]):  # FP16 everywhere else
        assert deployed < 0.5 * quantization, (deployed, quantization)


def test_profiles_that_cannot_run_an_artifact_say_which_can(q_dit, tiny_model_dirs, tmp_path):
    calib, _ = q_dit
    with pytest.raises(UserError, match="group-wise weights .*cannot run; export with --profile tensorrt or ort-dynamic"):
        export(calib, ExportConfig(buckets=2, profile="ort-cpu"), tmp_path / "a")
    with pytest.raises(UserError, match="static scales only .*--profile ort-dynamic.*--recipe q-dit-tensorrt"):
        export(calib, ExportConfig(buckets=2, fp32=True), tmp_path / "b")
    config = CalibConfig.from_bits("W4A8", method="q-dit", weight_group_size=8, act_dynamic=False, **TINY)
    asymmetric = calibrate(tiny_model_dirs["dit"], config, tmp_path / "asymmetric", progress=False)
    with pytest.raises(UserError, match="zero points of 0 only. Calibrate with --symmetric-groups"):
        export(asymmetric, ExportConfig(buckets=2, fp32=True), tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_group_sizes_onnx_runtime_cannot_run_are_refused_by_layer(tiny_model_dirs, tmp_path):
    calib = calibrate(tiny_model_dirs["dit"], CalibConfig.from_bits("W4A8", method="q-dit", weight_group_size=8, **TINY),
                      tmp_path / "calib", progress=False)  # fmt: skip
    with pytest.raises(UserError, match=r"transformer_blocks\.0\..*group size 8 cannot be deployed as MatMulNBits"):
        export(calib, ExportConfig(buckets=1, profile="ort-dynamic"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensorrt_lint_explains_why_it_refuses_an_ort_dynamic_graph(q_dit):
    from dilatequant.export.lint import lint_tensorrt

    _, out = q_dit
    violations = [v for v in lint_tensorrt(onnx.load(str(out / "bucket_0.onnx"))) if v.rule == "op"]
    assert violations and all("MatMulNBits" in str(v) and "--profile ort-dynamic" in str(v) for v in violations)


def test_an_artifact_without_static_tables_exports_one_graph_for_every_timestep(tiny_model_dirs, tmp_path):
    """Q-DiT with FP boundary layers: every quantized input is dynamic, so no scale depends on the timestep."""
    config = CalibConfig.from_bits("W4A8", method="q-dit", weight_group_size=16, boundary="fp", **TINY)
    calib = calibrate(tiny_model_dirs["dit"], config, tmp_path / "calib", progress=False)
    out = export(calib, ExportConfig(buckets=4, profile="ort-dynamic"), tmp_path / "export")
    manifest = json.loads((out / "manifest.json").read_text())
    assert load_artifact(calib).groups() == [] and manifest["n_buckets"] == 1 and manifest["buckets"]["ranges"] == [[0, 999]]
    for deployed, quantization in deployed_against_fake_quant(calib, out):
        assert deployed < 0.25 * quantization, (deployed, quantization)
