"""engines/torch_graph.py and the torch backend: ONNX semantics of Q/DQ, parity with ONNX Runtime's reference
kernels on every family's exports, the engine directory round trip, and clear errors."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.core.errors import UserError
from dilatequant.core.manifest import ArtifactError
from dilatequant.engines.config import BuildConfig
from dilatequant.engines.engine import build, load
from dilatequant.engines.torch_graph import TorchGraph
from dilatequant.export.config import ExportConfig
from dilatequant.export.flow import export, export_unquantized

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

TINY = {"samples": 32, "trajectories": 8, "steps": 5}
FAMILIES = ["unet", "unet-cond", "dit"]
# (bits, profile, fp32): the ONNX Runtime profile, TensorRT's FP16 default, and INT4-packed W4A8 for TensorRT
VARIANTS = [("W8A8", "ort-cpu", True), ("W8A8", "tensorrt", False), ("W4A8", "tensorrt", True)]


def reference_run(path, feeds: dict) -> np.ndarray:
    """ONNX Runtime with graph optimizations off: its reference kernel for every node, Q/DQ included."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def feeds_for(path, batch: int = 4) -> dict:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng, feeds = np.random.default_rng(0), {}
    for graph_input in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in graph_input.shape]
        float_type = np.float16 if graph_input.type == "tensor(float16)" else np.float32
        if graph_input.name == "t":
            feeds["t"] = np.full(shape, 500, np.int64)
        elif graph_input.type == "tensor(int64)":
            feeds[graph_input.name] = rng.integers(0, 4, shape).astype(np.int64)
        else:
            feeds[graph_input.name] = rng.standard_normal(shape).astype(float_type)
    return feeds


def psnr(output: np.ndarray, reference: np.ndarray) -> float:
    error = np.mean((output.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float(10 * np.log10(np.abs(reference).max() ** 2 / max(error, 1e-30)))


def single_node_graph(op: str, inputs: list, initializers: list, out_type: int, **attrs) -> bytes:
    node = helper.make_node(op, [i.name for i in inputs] + [i.name for i in initializers], ["y"], **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", out_type, None)], initializers)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), unsigned=st.booleans(), per_axis=st.booleans())
def test_quantize_linear_matches_onnx_runtime_rounding_ties_and_saturation(tmp_path_factory, seed, unsigned, per_axis):
    rng = np.random.default_rng(seed)
    scale = (rng.uniform(0.01, 0.1, 3) if per_axis else rng.uniform(0.01, 0.1, ())).astype(np.float32)
    zero = rng.integers(0, 256, scale.shape) if unsigned else rng.integers(-128, 128, scale.shape)
    zero = zero.astype(np.uint8 if unsigned else np.int8)
    steps = rng.integers(-300, 300, (2, 3, 4)).astype(np.float32) + 0.5  # exact ties (k + 0.5) and saturation
    x = (steps * (scale.reshape(1, -1, 1) if per_axis else scale)).astype(np.float32)
    path = tmp_path_factory.mktemp("q") / "q.onnx"
    path.write_bytes(single_node_graph("QuantizeLinear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                       [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")],
                                       TensorProto.UINT8 if unsigned else TensorProto.INT8, axis=1))  # fmt: skip
    expected = reference_run(path, {"x": x})
    assert np.array_equal(TorchGraph(path)(x=torch.from_numpy(x)).numpy(), expected)


def test_dequantize_linear_widens_packed_int4_weights_per_axis(tmp_path):
    values = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    scale = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    weight = helper.make_tensor("w", TensorProto.INT4, [4, 4], values.flatten().tolist())
    path = tmp_path / "dq.onnx"
    path.write_bytes(single_node_graph("DequantizeLinear", [], [weight, numpy_helper.from_array(scale, "s")], TensorProto.FLOAT, axis=0))
    assert np.array_equal(TorchGraph(path)().numpy(), values * scale[:, None])


@pytest.fixture(scope="module")
def exports(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("torch-backend")
    out = {}
    for family in FAMILIES:
        for bits in {bits for bits, _, _ in VARIANTS}:
            calib = calibrate(tiny_model_dirs[family], CalibConfig.from_bits(bits, method="minmax", **TINY),
                              root / f"{family}-{bits}-cal", progress=False)  # fmt: skip
            for variant in (v for v in VARIANTS if v[0] == bits):
                out[family, variant] = export(calib, ExportConfig(buckets=2, profile=variant[1], fp32=variant[2]), root / f"{family}-{variant}")
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=["-".join(map(str, v)) for v in VARIANTS])
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_runs_every_bucket_graph_like_onnx_runtime(exports, family, variant):
    """FP32 graphs agree up to rare rounding flips at exact ties (float summation order differs), FP16 ones up
    to FP16 arithmetic; measured minimum over these graphs: 41.7 dB FP32, 36.3 dB FP16."""
    for k in range(2):
        path = exports[family, variant] / f"bucket_{k}.onnx"
        feeds = feeds_for(path)
        output = TorchGraph(path)(**{name: torch.from_numpy(v) for name, v in feeds.items()}).float().numpy()
        assert psnr(output, reference_run(path, feeds).astype(np.float32)) > (35 if variant[2] else 30)


def test_unquantized_graph_matches_onnx_runtime_to_float_precision(tiny_model_dirs, tmp_path):
    path = export_unquantized(tiny_model_dirs["unet-cond"], "fp32", tmp_path / "fp32") / "bucket_0.onnx"
    feeds = feeds_for(path)
    output = TorchGraph(path)(**{name: torch.from_numpy(v) for name, v in feeds.items()}).numpy()
    np.testing.assert_allclose(output, reference_run(path, feeds), rtol=1e-4, atol=1e-5)


def test_torch_engines_stand_alone_and_run_each_bucket_graph(exports, tmp_path):
    source = exports["unet-cond", VARIANTS[0]]
    engines = build(source, BuildConfig(backend="torch", provider="cpu"), tmp_path / "engines")
    loaded = load(engines)
    assert loaded.manifest["backend"] == "torch" and loaded.manifest["provider"] == "cpu" and len(loaded) == 2
    assert sorted(p.name for p in engines.iterdir()) == ["bucket_0.onnx", "bucket_1.onnx", "manifest.json", "weights.bin"]
    feeds = feeds_for(source / "bucket_1.onnx")
    np.testing.assert_array_equal(loaded.run(1, feeds["x"], feeds["t"], feeds["cond"]),
                                  TorchGraph(source / "bucket_1.onnx")(**{n: torch.from_numpy(v) for n, v in feeds.items()}).numpy())  # fmt: skip


def test_unsupported_operators_and_options_are_named(exports, tmp_path):
    path = tmp_path / "hardmax.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    path.write_bytes(single_node_graph("Hardmax", [x], [], TensorProto.FLOAT))
    with pytest.raises(ArtifactError, match="does not implement: Hardmax. Build it with the onnxruntime backend"):
        TorchGraph(path)
    with pytest.raises(UserError, match="--streams is an onnxruntime option"):
        BuildConfig(backend="torch", streams=2)
    if not torch.cuda.is_available():
        with pytest.raises(ArtifactError, match="sees no CUDA GPU here. Use --provider cpu"):
            build(exports["unet", VARIANTS[0]], BuildConfig(backend="torch", provider="cuda"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("signed", [True, False])
def test_blocked_dequantize_linear_matches_onnx_runtime(tmp_path, signed):
    """Block-quantized int4 weights (opset 21 `block_size`: TensorRT's and Q-DiT's group-wise layout): one scale and
    zero point per 32 input channels of every column."""
    rng = np.random.default_rng(0)
    low, high, kind = (-8, 7, TensorProto.INT4) if signed else (0, 15, TensorProto.UINT4)
    values = rng.integers(low, high + 1, (64, 6))
    scale = rng.uniform(0.01, 0.1, (2, 6)).astype(np.float32)
    zero = rng.integers(low, high + 1, (2, 6))
    weight = helper.make_tensor("w", kind, [64, 6], values.flatten().tolist())
    zeros = helper.make_tensor("z", kind, [2, 6], zero.flatten().tolist())
    path = tmp_path / "blocked.onnx"
    path.write_bytes(single_node_graph("DequantizeLinear", [], [weight, numpy_helper.from_array(scale, "s"), zeros], TensorProto.FLOAT,
                                       axis=0, block_size=32))  # fmt: skip
    expected = reference_run(path, {})
    assert np.allclose(expected, (values - np.repeat(zero, 32, axis=0)) * np.repeat(scale, 32, axis=0))
    assert np.array_equal(TorchGraph(path)().numpy(), expected)


def test_blocked_quantize_linear_matches_onnx_runtime(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    scale = rng.uniform(0.01, 0.05, (3, 4)).astype(np.float32)
    zero = rng.integers(-20, 20, (3, 4)).astype(np.int8)
    path = tmp_path / "blocked-q.onnx"
    path.write_bytes(single_node_graph("QuantizeLinear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                       [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")], TensorProto.INT8,
                                       axis=1, block_size=16))  # fmt: skip
    assert np.array_equal(TorchGraph(path)(x=torch.from_numpy(x)).numpy(), reference_run(path, {"x": x}))


def test_a_per_tensor_scale_needs_no_axis_of_that_rank(tmp_path):
    """An int32 bias (rank 1) dequantized with a per-tensor scale and the default axis 1, as quantize_static writes it."""
    bias = np.array([3, -7, 12], np.int32)
    path = tmp_path / "bias.onnx"
    path.write_bytes(single_node_graph("DequantizeLinear", [], [numpy_helper.from_array(bias, "b"), numpy_helper.from_array(np.float32(0.25), "s"),
                                                             numpy_helper.from_array(np.int32(0), "z")], TensorProto.FLOAT))  # fmt: skip
    assert np.array_equal(TorchGraph(path)().numpy(), reference_run(path, {}))
