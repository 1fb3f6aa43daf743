"""Group-wise weights deployed as ONNX Runtime's MatMulNBits compute what the fake quantizers simulate."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from dilatequant.calibrate.groupwise import DynamicActQuantizer, GroupWeightQuantizer
from dilatequant.core.errors import UserError
from dilatequant.export.matmul_nbits import matmul_nbits, pack


def run_layer(quantizer: GroupWeightQuantizer, w: torch.Tensor, x: np.ndarray, accuracy_level: int, bias=None) -> np.ndarray:
    node, tensors = matmul_nbits("fc", "x", "y", w.numpy(), quantizer.step.detach().numpy(), quantizer.zero_point.numpy(),
                                 quantizer.fmt.bits, quantizer.fmt.symmetric, accuracy_level, bias)  # fmt: skip
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", w.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", w.shape[0]])], tensors)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def layer(seed: int, out: int = 48, width: int = 128) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, width, generator=g) * torch.linspace(0.2, 3.0, width)  # channel spread, as in DiT weights
    return w, (torch.randn(16, width, generator=g) * 2).numpy()


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 64, True), (4, 16, False), (8, 128, True), (8, 32, False)])
def test_weight_only_matmul_nbits_equals_the_fake_quantized_layer(bits, group_size, symmetric):
    w, x = layer(bits + group_size)
    quantizer = GroupWeightQuantizer(w, bits, group_size, symmetric)
    bias = np.linspace(-1, 1, w.shape[0]).astype(np.float32)
    expected = x @ quantizer(w).detach().numpy().T + bias
    got = run_layer(quantizer, w, x, accuracy_level=0, bias=bias)  # float A: only the weights are quantized
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_accuracy_level_4_matches_symmetric_dynamic_int8_blocks_of_the_input():
    """ONNX Runtime's integer path quantizes each row's block of A to int8 with a symmetric scale: the fake quantizer
    with those groups reproduces it up to float summation order (2.6e-7 measured); other grids miss by ~1e-2."""
    w, x = layer(7)
    quantizer = GroupWeightQuantizer(w, 4, 32)
    got = run_layer(quantizer, w, x, accuracy_level=4)
    weight = quantizer(w).detach()
    simulated = DynamicActQuantizer(8, group_size=32, symmetric=True)(torch.from_numpy(x)).numpy() @ weight.numpy().T
    weight_only = x @ weight.numpy().T
    scale = np.abs(weight_only).max()
    assert np.abs(got - simulated).max() <= 1e-5 * scale
    asymmetric = DynamicActQuantizer(8, group_size=32)(torch.from_numpy(x)).numpy() @ weight.numpy().T
    assert min(np.abs(got - weight_only).max(), np.abs(got - asymmetric).max()) > 1e-3 * scale


def test_nibbles_pack_low_first_and_pad_an_odd_count():
    values = np.array([[1, 2, 3]], np.uint8)
    assert pack(values, 4).tolist() == [[0x21, 0x03]] and pack(values, 8).tolist() == [[1, 2, 3]]


def test_what_onnx_runtime_cannot_run_is_refused_by_name():
    w, _ = layer(0, width=96)
    quantizer = GroupWeightQuantizer(w, 4, 96)
    with pytest.raises(UserError, match="group size 96 cannot be deployed as MatMulNBits.*16, 32, 64, 128, 256"):
        matmul_nbits("blocks.0.fc1", "x", "y", w.numpy(), quantizer.step.detach().numpy(), quantizer.zero_point.numpy(), 4, False)
    with pytest.raises(UserError, match="6-bit group-wise weights cannot be deployed"):
        matmul_nbits("blocks.0.fc1", "x", "y", w.numpy(), quantizer.step.detach().numpy(), quantizer.zero_point.numpy(), 6, False)


def test_the_layer_benchmark_deploys_what_it_simulates():
    import json

    from click.testing import CliRunner

    from dilatequant.tools import layer_bench

    args = ["--tokens", "32", "--width", "64", "--out-features", "32", "--group-size", "32", "--rounds", "2", "--threads", "1"]
    result = CliRunner().invoke(layer_bench.main, args, catch_exceptions=False)
    layers = json.loads(result.output)["layers"]
    assert len(layers) == 3 and all(row["max_error_vs_simulated"] < 1e-5 and row["p50_ms"] > 0 for row in layers.values())
