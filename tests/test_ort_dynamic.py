"""The ort-dynamic profile: Q-DiT artifacts (group-wise weights, dynamic activations) deployed to ONNX Runtime as
MatMulNBits, and refused by name where a profile cannot run them."""

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
    report = ort_fusion(out / "bucket_0.onnx")
    assert report["matmul_nbits"] == {"nodes": len(grouped), "integer_inputs": len(grouped)}


def test_onnx_runtime_follows_the_fake_quantized_model_in_every_bucket(q_dit):
    """End to end on the check inputs: the deployed graph against the torch fake-quant model with the same bucket
    rows. The group-wise layers compute the same integers (test_matmul_nbits.py); what differs is the static
    boundary layers' fused requantization and float summation order."""
    calib, out = q_dit
    artifact = load_artifact(calib)
    manifest = json.loads((out / "manifest.json").read_text())
    table = BucketTable.from_dict(manifest["buckets"])
    model = bucketed_model(artifact, table, quantized_outputs=frozenset(manifest["quantized_outputs"])).denoiser
    fp = artifact.model.denoiser
    data = artifact.calibration_data()
    for k in range(len(table)):
        chosen = torch.tensor([table.bucket_of(float(t)) == k for t in data.t])
        x, t, labels = (v[chosen][:4] for v in (data.x, data.t, data.labels))
        cond = model.conditioning(labels)
        session = ort.InferenceSession(str(out / f"bucket_{k}.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x.numpy(), "t": t.numpy(), "cond": cond.numpy()})[0]
        with torch.no_grad():
            expected = model(x, t, cond).numpy()
            fp.set_quantization(activations=False, weights=False)
            unquantized = fp(x, t, cond).numpy()
            fp.set_quantization(activations=True, weights=True)
        deployed_error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        quantization_error = np.linalg.norm(unquantized - expected) / np.linalg.norm(expected)
        assert deployed_error < 0.25 * quantization_error, (k, deployed_error, quantization_error)


def test_profiles_that_cannot_run_q_dit_say_which_can(q_dit, tmp_path):
    calib, _ = q_dit
    for profile in ("tensorrt", "ort-cpu"):
        with pytest.raises(UserError, match="group-wise weights .*cannot run; export with --profile ort-dynamic"):
            export(calib, ExportConfig(buckets=2, profile=profile, fp32=True), tmp_path / profile)
        assert not (tmp_path / profile).exists()


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
