"""Quantized attention deployed: Q/DQ on q, kᵀ, the probabilities and v of every attention, per bucket, in both
profiles; ONNX Runtime against the torch fake-quant model on the three tiny families; the lint rules of its placement."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_export import check_buckets_against_torch

from dilatequant.calibrate.artifact import load_artifact
from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.calibrate.rebucket import bucketed_model
from dilatequant.core.buckets import BucketTable
from dilatequant.core.errors import UserError
from dilatequant.export.config import ExportConfig
from dilatequant.export.flow import export
from dilatequant.export.lint import lint_tensorrt, ort_fusion

ort = pytest.importorskip("onnxruntime")
TINY = {"samples": 32, "trajectories": 8, "steps": 5}
FAMILIES = ("unet", "unet-cond", "dit")
PROFILES = ("tensorrt", "ort-cpu")


@pytest.fixture(scope="module")
def attention_exports(tiny_model_dirs, tmp_path_factory):
    """W8A8 min/max with quantized attention (the softmax on log√2 levels: deployed uniform) per family, each exported
    to both profiles with 2 buckets; (family, profile) -> (artifact, export)."""
    root = tmp_path_factory.mktemp("attention-export")
    done = {}
    for family in FAMILIES:
        config = CalibConfig.from_bits("W8A8", method="minmax", quantize_attention=True, softmax_quantizer="log-sqrt2", **TINY)
        calib = calibrate(tiny_model_dirs[family], config, root / family, progress=False)
        for profile in PROFILES:
            done[family, profile] = calib, export(calib, ExportConfig(buckets=2, profile=profile, fp32=True), root / f"{family}-{profile}")
    return done


def attention_matmuls(model) -> list:
    """The MatMuls of two activations (neither input a weight)."""
    producers = {name: node for node in model.graph.node for name in node.output}
    weights = {i.name for i in model.graph.initializer}

    def constant(name):
        node = producers.get(name)
        return name in weights or (node is not None and node.op_type == "DequantizeLinear" and node.input[0] in weights)

    return [n for n in model.graph.node if n.op_type == "MatMul" and not any(constant(i) for i in n.input)]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_runtime_quantizes_attention_like_torch_in_every_bucket(attention_exports, family, profile):
    """Every Q/DQ (the attention ones included) computes the torch quantizer of its bucket on its own input, and the
    graph follows the fake-quant model end to end (random tiny weights amplify rounding flips: 10%, as without
    quantized attention, test_export.py)."""
    calib, out = attention_exports[family, profile]
    check_buckets_against_torch(out, calib)


@pytest.mark.parametrize("profile", PROFILES)
def test_both_matmuls_of_every_attention_take_quantized_inputs(attention_exports, profile):
    calib, out = attention_exports["unet-cond", profile]
    model = onnx.load(str(out / "bucket_0.onnx"))
    producers = {name: node for node in model.graph.node for name in node.output}
    quantizers = [name for name in bucketed_model(load_artifact(calib), BucketTable.from_dict(
        json.loads((out / "manifest.json").read_text())["buckets"])).denoiser.act_quantizers() if ".attn_" in name]  # fmt: skip
    matmuls = attention_matmuls(model)
    assert len(matmuls) == len(quantizers) // 2 > 0  # q·kᵀ and probs·v of each attention
    for node in matmuls:
        assert [producers[i].op_type for i in node.input] == ["DequantizeLinear", "DequantizeLinear"], node.name
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["attention"]["quantized_inputs"]) == sorted(quantizers)
    assert "log-sqrt2, deployed uniform" in manifest["attention"]["softmax"]


def test_tensorrt_attention_is_per_tensor_symmetric_and_lints_clean(attention_exports, tmp_path):
    calib, _ = attention_exports["unet-cond", "tensorrt"]
    half = export(calib, ExportConfig(buckets=2), tmp_path / "fp16")  # the profile's default precision
    assert lint_tensorrt(onnx.load(str(half / "bucket_0.onnx"))) == []
    for family in FAMILIES:
        model = onnx.load(str(attention_exports[family, "tensorrt"][1] / "bucket_0.onnx"))
        assert lint_tensorrt(model) == []
        initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        producers = {name: node for node in model.graph.node for name in node.output}
        for node in attention_matmuls(model):
            for name in node.input:
                dq = producers[name]
                assert initializers[dq.input[1]].ndim == 0 and initializers[dq.input[2]].dtype == np.int8
                assert initializers[dq.input[2]] == 0


def test_onnx_runtime_runs_the_attention_matmuls_on_integer_kernels(attention_exports, tmp_path):
    """With float attention ONNX Runtime keeps its q·kᵀ and probs·v as MatMul/FusedMatMul; quantized, none is left."""
    calib, out = attention_exports["unet-cond", "ort-cpu"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "bucket_0.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    assert "MatMul" not in ops and "FusedMatMul" not in ops
    assert ops.count("QLinearMatMul") + ops.count("MatMulIntegerToFloat") >= len(attention_matmuls(onnx.load(str(out / "bucket_0.onnx"))))


def test_the_log_sqrt2_softmax_deploys_as_a_uniform_table_within_zero_and_one(attention_exports):
    calib, out = attention_exports["dit", "ort-cpu"]
    table = BucketTable.from_dict(json.loads((out / "manifest.json").read_text())["buckets"])
    model = bucketed_model(load_artifact(calib), table).denoiser
    probs = {name: q for name, q in model.act_quantizers().items() if name.endswith(".attn_probs")}
    assert probs and all(len(q.step) == len(table) and q.enabled for q in probs.values())
    assert all(float(q.step.detach().max()) * q.fmt.qmax <= 1.0 + 1e-6 for q in probs.values())


def remove_pair(model, quantize):
    """Bypass a Q/DQ pair: its DQ's consumers read the Q's input."""
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == quantize.output[0])
    for node in model.graph.node:
        node.input[:] = [quantize.input[0] if i == dq.output[0] else i for i in node.input]
    model.graph.node.remove(dq)
    model.graph.node.remove(quantize)


def probs_quantizer(model):
    softmax_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Softmax"}
    casts = {n.output[0] for n in model.graph.node if n.op_type == "Cast" and n.input[0] in softmax_outputs}
    return next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in softmax_outputs | casts)


def test_lint_flags_misplaced_attention_qdq(attention_exports):
    path = attention_exports["unet-cond", "tensorrt"][1] / "bucket_0.onnx"
    unquantized_probs = onnx.load(str(path))
    remove_pair(unquantized_probs, probs_quantizer(unquantized_probs))
    assert {v.rule for v in lint_tensorrt(unquantized_probs)} == {"attention-pair"}

    late = onnx.load(str(path))  # the probabilities quantized after another op, not right after the Softmax
    quantize = probs_quantizer(late)
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    late.graph.initializer.append(one)
    late.graph.node.insert(list(late.graph.node).index(quantize), helper.make_node("Mul", [quantize.input[0], "one"], ["late"], name="late"))
    quantize.input[0] = "late"
    violations = lint_tensorrt(late)
    assert {v.rule for v in violations} == {"softmax-output"} and "after a Mul" in str(violations[0])


def test_per_head_tables_are_refused_by_export(tiny_model_dirs, tmp_path):
    config = CalibConfig.from_bits("W8A8", method="minmax", quantize_attention=True, attention_head_tables=True, **TINY)
    calib = calibrate(tiny_model_dirs["dit"], config, tmp_path / "calib", progress=False)
    with pytest.raises(UserError, match="one scale per head.*without --head-tables"):
        export(calib, ExportConfig(buckets=2), tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_an_attention_that_is_not_explicit_is_a_clear_error():
    import onnx_graphsurgeon as gs

    from dilatequant.export.graph import attention_inputs

    x = gs.Variable("x", np.float32, [1, 4, 4])
    y = gs.Variable("y", np.float32, [1, 4, 4])
    fused = gs.Graph(nodes=[gs.Node("Softmax", name="/denoiser/model/blocks.0/attn/Softmax", inputs=[x], outputs=[y])],
                     inputs=[x], outputs=[y])  # fmt: skip
    with pytest.raises(UserError, match="Attention 'blocks.0.attn' did not export as q·kᵀ, softmax, ·v"):
        attention_inputs(fused, ["blocks.0.attn"])


@pytest.mark.slow
def test_digits_with_quantized_attention_deploys_to_onnx_runtime(tmp_path):
    """The bundled model: every attention matmul on an integer kernel, the graph within 2% of the fake-quant model."""
    config = CalibConfig.from_bits("W8A8", method="minmax", quantize_attention=True, samples=64, trajectories=8, steps=10)
    calib = calibrate("digits", config, tmp_path / "calib", progress=False)
    out = export(calib, ExportConfig(buckets=4, profile="ort-cpu"), tmp_path / "export")
    check_buckets_against_torch(out, calib, samples_per_bucket=2, end_to_end_rtol=0.02)
    report = ort_fusion(out / "bucket_0.onnx")
    assert report["fused_share"] >= 0.95 and report["left_in_float"] == ["conv_out"]
