"""Q-DiT's formats: group-wise weight grids (error bounds, MSE never worse than min/max) and dynamic activation grids
(equal to ONNX's DynamicQuantizeLinear as ONNX Runtime runs it)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from dilatequant.calibrate.groupwise import DynamicActQuantizer, GroupWeightQuantizer, legal_group_sizes
from dilatequant.calibrate.quantizer import WeightQuantizer
from dilatequant.core.errors import UserError


def weight(seed: int, out: int = 8, width: int = 64, outlier: float = 1.0) -> torch.Tensor:
    w = torch.randn(out, width, generator=torch.Generator().manual_seed(seed))
    w[:, 3] *= outlier  # an outlier input channel, as Q-DiT observes in DiT weights
    return w


def group_steps(q: GroupWeightQuantizer) -> torch.Tensor:
    """Each element's own step, [out, in]."""
    return q.step.detach().repeat_interleave(q.group_size, dim=1)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([4, 8]), st.sampled_from([8, 16, 32, 64]), st.booleans(), st.floats(1.0, 50.0), st.integers(0, 2**16))
def test_every_weight_lies_within_half_a_step_of_its_group_grid(bits, group_size, symmetric, outlier, seed):
    w = weight(seed, outlier=outlier)
    q = GroupWeightQuantizer(w, bits, group_size, symmetric=symmetric)
    error = (q(w) - w).abs()
    assert torch.all(error <= group_steps(q) / 2 * (1 + 1e-5) + 1e-7)
    if symmetric:  # each group's largest magnitude sits exactly on the grid
        groups = w.unflatten(1, (-1, group_size))
        top = groups.abs().argmax(-1, keepdim=True)
        assert torch.allclose(q(w).unflatten(1, (-1, group_size)).gather(-1, top), groups.gather(-1, top), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([16, 32]), st.floats(5.0, 50.0), st.integers(0, 2**16))
def test_groups_confine_an_outlier_channel_to_its_own_group(group_size, outlier, seed):
    """A per-row grid is stretched by the outlier for every channel; a group grid only for the outlier's group."""
    w = weight(seed, outlier=outlier)
    grouped, per_row = GroupWeightQuantizer(w, 4, group_size, symmetric=True), WeightQuantizer(w, 4)
    row_steps = per_row.step.detach().unsqueeze(1)
    assert torch.all(grouped.step.detach() <= row_steps * (1 + 1e-6))
    far = slice(group_size, None)  # groups without the outlier channel 3
    assert (grouped(w) - w)[:, far].pow(2).mean() < (per_row(w) - w)[:, far].pow(2).mean()


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_ranges_are_never_worse_than_min_max_per_group(symmetric):
    w = weight(0, out=16, width=128, outlier=20.0)
    errors = {init: (GroupWeightQuantizer(w, 4, 32, symmetric, init)(w) - w).pow(2).unflatten(1, (-1, 32)).sum(-1)
              for init in ("minmax", "mse")}  # fmt: skip
    assert torch.all(errors["mse"] <= errors["minmax"] + 1e-7) and errors["mse"].sum() < errors["minmax"].sum()


def test_group_steps_train_through_the_straight_through_estimator():
    w = weight(1)
    q = GroupWeightQuantizer(w, 4, 16)
    (q(w) - 2 * w).pow(2).sum().backward()
    assert q.step.grad is not None and q.step.grad.abs().sum() > 0


def dynamic_quantize_linear(x: np.ndarray) -> np.ndarray:
    """ONNX DynamicQuantizeLinear then DequantizeLinear, run by ONNX Runtime."""
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zero"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)  # what ONNX Runtime reads
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.floats(-3.0, 3.0), st.floats(1e-3, 1e3), st.sampled_from([(7,), (4, 33), (2, 5, 16)]))
def test_per_tensor_dynamic_quantization_is_onnx_dynamic_quantize_linear(seed, shift, scale, shape):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) + shift) * scale
    ours = DynamicActQuantizer(per_tensor=True)(x).numpy()
    onnx_runtime = dynamic_quantize_linear(x.numpy())
    step = (max(x.max().item(), 0) - min(x.min().item(), 0)) / 255
    # equal up to float rounding, and never a whole grid step apart
    assert np.abs(ours - onnx_runtime).max() <= 1e-5 * step + 1e-6 * np.abs(onnx_runtime).max()


def test_per_token_groups_are_each_quantized_as_onnx_quantizes_a_tensor():
    x = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 10, 64)
    ours = DynamicActQuantizer(group_size=16)(x)
    for token in x.flatten(0, 1).unflatten(-1, (4, 16)).flatten(0, 1):  # every (token, group) on its own
        index = (x.flatten(0, 1).unflatten(-1, (4, 16)).flatten(0, 1) == token).all(-1).nonzero()[0, 0]
        expected = dynamic_quantize_linear(token.numpy())
        got = ours.flatten(0, 1).unflatten(-1, (4, 16)).flatten(0, 1)[index].numpy()
        assert np.allclose(got, expected, atol=1e-6 * np.abs(expected).max() + 1e-7)
    assert torch.allclose(DynamicActQuantizer(group_size=None)(x), DynamicActQuantizer(group_size=64)(x))


def test_dynamic_grids_pass_gradients_to_the_input_and_handle_all_zero_groups():
    x = torch.randn(2, 32, requires_grad=True)
    DynamicActQuantizer(group_size=8)(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through
    zeros = torch.zeros(2, 32)
    assert torch.equal(DynamicActQuantizer(group_size=8)(zeros), zeros)


def test_group_sizes_that_do_not_divide_are_refused_with_the_divisors():
    with pytest.raises(UserError, match=r"group size 48 does not divide the 64 input channels of blocks.0.fc1.*32"):
        GroupWeightQuantizer(weight(0), 4, 48, layer="blocks.0.fc1")
    with pytest.raises(UserError, match="does not divide the 64 input channels"):
        DynamicActQuantizer(group_size=48)(torch.randn(2, 64))
    with pytest.raises(UserError, match="not both"):
        DynamicActQuantizer(group_size=8, per_tensor=True)
    with pytest.raises(UserError, match="Linear layers"):
        GroupWeightQuantizer(torch.randn(4, 4, 3, 3), 4, 4)
    assert legal_group_sizes(1152, (32, 64, 128, 192, 288)) == [32, 64, 128, 192, 288]  # Q-DiT's choices on DiT-XL/2
    assert legal_group_sizes(96, (32, 64, 128)) == [32]


def test_q_dit_quantizes_a_dit_with_groups_and_dynamic_inputs_and_reloads_it(tiny_model_dirs, tmp_path):
    """The q-dit recipe end to end on the tiny DiT: every non-boundary Linear is group-wise with a dynamic input,
    the artifact rebuilds the same model, and switching quantization off gives the FP model back (no dilation)."""
    from dilatequant.calibrate.config import CalibConfig
    from dilatequant.calibrate.contract import load_artifact
    from dilatequant.calibrate.flow import calibrate
    from dilatequant.core.denoiser import load_model

    config = CalibConfig.from_bits("W4A8", method="q-dit", weight_group_size=4, samples=8, trajectories=8, steps=4)
    artifact = load_artifact(calibrate(tiny_model_dirs["dit"], config, tmp_path / "c", progress=False))
    quantized = artifact.model.denoiser
    grouped = {row.layer for row in quantized.plan if row.group_size}
    assert grouped and all(row.group_size == 4 for row in quantized.plan if row.group_size and not row.boundary)
    for name, wrapper in quantized.quant_layers().items():
        assert isinstance(wrapper.weight_quantizer, GroupWeightQuantizer) == (name in grouped)
        assert isinstance(wrapper.input_quantizer, DynamicActQuantizer) == (name in grouped)
        if name in grouped:  # 4-bit: at most 16 values in every (row, group) of the deployed weight
            groups = wrapper.weight_quantizer(wrapper.layer.weight).detach().unflatten(1, (-1, 4))
            assert max(len(torch.unique(g)) for g in groups.flatten(0, 1)) <= 16
    x, t = torch.randn(2, *quantized.sample_shape), torch.tensor([999, 10])
    cond = quantized.conditioning(torch.tensor([1, 2]))
    with torch.no_grad():
        again = load_artifact(tmp_path / "c").model.denoiser
        assert torch.equal(quantized(x, t, cond), again(x, t, cond))
        quantized.set_quantization(activations=False, weights=False)
        fp = load_model(tiny_model_dirs["dit"]).denoiser
        assert torch.allclose(quantized(x, t, cond), fp(x, t, cond), atol=1e-5)


def test_a_group_size_that_does_not_divide_a_layer_is_refused_before_calibrating(tiny_model_dirs, tmp_path):
    from dilatequant.calibrate.config import CalibConfig
    from dilatequant.calibrate.flow import calibrate

    with pytest.raises(UserError, match="weight_group_size=0 has no groups"):
        CalibConfig(method="q-dit", weight_group_size=0)
    with pytest.raises(UserError, match="turn one of them off"):
        CalibConfig(method="q-dit", dilation=True)

    config = CalibConfig.from_bits("W4A8", method="q-dit", weight_group_size=5, samples=8, trajectories=8, steps=4)
    with pytest.raises(UserError, match=r"group size 5 does not divide the \d+ input channels of transformer_blocks\.0\."):
        calibrate(tiny_model_dirs["dit"], config, tmp_path / "c", progress=False)
