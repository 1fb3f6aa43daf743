"""lint: the TensorRT explicit-quantization rules on hand-built graphs, and on exported graphs."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.core.errors import UserError
from dilatequant.export.config import ExportConfig
from dilatequant.export.flow import export
from dilatequant.export.lint import lint_tensorrt
from dilatequant.tools.cli import cli


def graph(zero_point=0, consumer="Conv", dq_is_output=False, second_q=False, scale=0.1):
    """x -> Q -> DQ -> Conv(W: int8 -> DQ axis 0) -> y, with one rule bent by the arguments."""
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(zero_point, np.int8), "z"),
             numpy_helper.from_array(np.ones((4, 2, 1, 1), np.int8), "w"), numpy_helper.from_array(np.full(4, 0.5, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "wz")]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wdq", axis=0),
             helper.make_node(consumer, ["xd", "wd"] if consumer == "Conv" else ["xd"], ["y"], name="op")]  # fmt: skip
    if second_q:
        nodes.append(helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq2"], name="q2"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if dq_is_output:
        outputs.append(helper.make_tensor_value_info("xd", TensorProto.FLOAT, None))
    return helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                                               outputs, inits))  # fmt: skip


def rules(model):
    return {v.rule for v in lint_tensorrt(model)}


def test_a_compliant_graph_is_clean():
    assert lint_tensorrt(graph()) == []


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [({"zero_point": 3}, "symmetric"), ({"consumer": "Relu"}, "placement"), ({"dq_is_output": True}, "output"),
     ({"second_q": True}, "shared-qdq"), ({"scale": -1.0}, "scale")],
)  # fmt: skip
def test_each_rule_names_the_violation(kwargs, rule):
    assert rule in rules(graph(**kwargs))


def test_wrong_weight_axis_is_reported():
    model = graph()
    next(n for n in model.graph.node if n.name == "wdq").attribute[0].i = 1
    violations = lint_tensorrt(model)
    assert [v.node for v in violations] == ["wdq"] and "axis 1, Conv needs 0" in violations[0].message


@pytest.fixture(scope="module")
def exported(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("lint")
    calib = calibrate(tiny_model_dirs["unet-cond"], CalibConfig(method="minmax", samples=16, trajectories=4, steps=4),
                      root / "calib", progress=False)  # fmt: skip
    return {p: export(calib, ExportConfig(buckets=2, profile=p, fp32=True), root / p) for p in ("tensorrt", "ort-cpu")}


def test_exported_tensorrt_graphs_lint_clean_and_ort_graphs_do_not(exported):
    for k in range(2):
        assert lint_tensorrt(onnx.load(str(exported["tensorrt"] / f"bucket_{k}.onnx"))) == []
    assert "shared-qdq" in rules(onnx.load(str(exported["ort-cpu"] / "bucket_0.onnx")))  # one pair per consumer


def test_cli_lint_exit_codes(exported, tmp_path):
    clean = CliRunner().invoke(cli, ["lint", str(exported["tensorrt"] / "bucket_0.onnx")])
    assert clean.exit_code == 0 and "0 violation(s)" in clean.output
    onnx.save(graph(zero_point=3), str(tmp_path / "bad.onnx"))
    bad = CliRunner().invoke(cli, ["lint", str(tmp_path / "bad.onnx")])
    assert bad.exit_code == 1 and "[symmetric] q:" in bad.output
    report = CliRunner().invoke(cli, ["lint", str(exported["ort-cpu"] / "bucket_0.onnx"), "--profile", "ort-cpu", "--min-fused", "0"])
    assert report.exit_code == 0 and json.loads(report.stdout)["quantized_compute_nodes"] > 0


def test_a_graph_with_external_weights_is_linted_without_reading_them(tmp_path):
    """A graph beyond protobuf's 2 GB keeps its weights in external data: lint reads only the Q/DQ scales and zero
    points (a negative weight scale here, in the external file, is still found); the weights stay on disk. ONNX
    Runtime's fusion report saves its optimized graph with external initializers too."""
    from onnx.external_data_helper import uses_external_data

    from dilatequant.export.lint import load_for_lint, ort_fusion

    model = graph()
    model.ir_version, model.opset_import[0].version = 9, 19  # what ONNX Runtime reads
    weight_scale = next(i for i in model.graph.initializer if i.name == "ws")
    weight_scale.CopyFrom(numpy_helper.from_array(np.full(4, -0.5, np.float32), "ws"))
    onnx.save_model(model, str(tmp_path / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
                    size_threshold=0)  # fmt: skip
    loaded = load_for_lint(tmp_path / "g.onnx")
    kept = {i.name for i in loaded.graph.initializer if uses_external_data(i)}
    assert kept == {"w"}
    assert [v.rule for v in lint_tensorrt(loaded)] == ["scale"]
    assert ort_fusion(tmp_path / "g.onnx")["quantized_compute_nodes"] == 1
    (tmp_path / "not.onnx").write_text("hello")
    with pytest.raises(UserError, match="not an ONNX model"):
        load_for_lint(tmp_path / "not.onnx")


def test_a_graph_without_quantized_layers_reports_nothing_to_fuse_without_a_session(tmp_path, monkeypatch):
    """An FP32 export has nothing to fuse; an ONNX Runtime session of an SDXL-size one alone would hold ~2x its
    weights, so the report comes from the graph."""
    import onnxruntime

    from dilatequant.export.lint import ort_fusion

    conv = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="op")], "fp",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                             [numpy_helper.from_array(np.ones((4, 2, 1, 1), np.float32), "w")])  # fmt: skip
    onnx.save(helper.make_model(conv), str(tmp_path / "fp.onnx"))
    onnx.save(graph(), str(tmp_path / "q.onnx"))
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: pytest.fail("a session was made"))
    assert ort_fusion(tmp_path / "fp.onnx") == {"quantized_compute_nodes": 0, "integer_kernels": 0, "fused_share": 0.0, "left_in_float": [],
                                                "integer_kernel_types": [], "matmul_nbits": {"nodes": 0, "integer_inputs": 0}}  # fmt: skip
    with pytest.raises(pytest.fail.Exception, match="a session was made"):  # a quantized graph is optimized by ONNX Runtime
        ort_fusion(tmp_path / "q.onnx")
