"""Quantizer math: error bounds, straight-through gradients, per-timestep tables."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilatequant.calibrate.quantizer import (
    ActQuantizer,
    IntFormat,
    WeightQuantizer,
    asymmetric_step_and_zero,
    fake_quantize,
    mse_search_amax,
    symmetric_step,
)  # fmt: skip
from dilatequant.calibrate.timesteps import TimestepIndex


@pytest.mark.parametrize(("bits", "symmetric", "qmin", "qmax"), [(8, True, -128, 127), (4, True, -8, 7), (8, False, 0, 255)])
def test_integer_grids(bits, symmetric, qmin, qmax):
    fmt = IntFormat(bits, symmetric)
    assert (fmt.qmin, fmt.qmax) == (qmin, qmax)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([4, 6, 8]), st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_symmetric_error_is_at_most_half_a_step_inside_the_range(bits, amax, seed):
    fmt = IntFormat(bits)
    x = (torch.rand(1000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1) * amax
    step = symmetric_step(torch.tensor(amax, dtype=torch.float64), fmt)
    assert (fake_quantize(x, step, 0.0, fmt) - x).abs().max() <= step / 2 * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(st.floats(-50, -1e-2), st.floats(1e-2, 50), st.integers(0, 2**16))
def test_asymmetric_error_is_at_most_half_a_step_and_zero_point_is_an_integer(lo, hi, seed):
    fmt = IntFormat(8, symmetric=False)
    x = lo + (hi - lo) * torch.rand(1000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    step, zero = asymmetric_step_and_zero(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), fmt)
    assert zero == zero.round() and fmt.qmin <= zero <= fmt.qmax
    # the rounded zero point shifts the grid by at most half a step at either end
    assert (fake_quantize(x, step, zero, fmt) - x).abs().max() <= step * (1 + 1e-9)


def test_out_of_range_values_saturate_and_get_no_input_gradient():
    fmt, step = IntFormat(8), torch.tensor(0.1, requires_grad=True)
    x = torch.tensor([0.5, 100.0, -100.0], requires_grad=True)
    y = fake_quantize(x, step, 0.0, fmt)
    assert y.tolist() == pytest.approx([0.5, 12.7, -12.8])
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0]  # straight through inside, zero where clamped
    assert step.grad is not None and step.grad != 0  # the step is learnable


def test_weight_quantizer_is_per_output_channel():
    weight = torch.stack([torch.linspace(-1, 1, 9), torch.linspace(-100, 100, 9)])
    quantizer = WeightQuantizer(weight, bits=4)
    assert quantizer.step.tolist() == pytest.approx([1 / 7, 100 / 7])
    error = (quantizer(weight) - weight).abs().amax(1)
    assert (error <= quantizer.step.detach() / 2 + 1e-6).all()


def test_mse_search_clips_heavy_tails():
    x = torch.cat([torch.randn(10000, generator=torch.Generator().manual_seed(0)), torch.tensor([50.0])])
    fmt = IntFormat(4)
    amax = x.abs().max()
    clipped = mse_search_amax(x, amax, fmt)
    mse = lambda a: (fake_quantize(x, symmetric_step(a, fmt), 0.0, fmt) - x).pow(2).mean()  # noqa: E731
    assert clipped < amax and mse(clipped) < mse(amax)


def test_tpq_gathers_each_samples_own_row_and_scatters_gradients_back():
    index = TimestepIndex(torch.tensor([999, 500, 0]))
    quantizer = ActQuantizer(index, rows=3, bits=8, symmetric=True, channel_dim=1)
    with torch.no_grad():
        quantizer.step.copy_(torch.tensor([1.0, 0.1, 0.01]))
    quantizer.enabled = True
    x = torch.full((3, 2, 4, 4), 0.123)
    index.set_timesteps(torch.tensor([0, 999, 480]))  # rows 2, 0, 1 (480 is nearest to 500)
    y = quantizer(x)
    assert [v.item() for v in y[:, 0, 0, 0]] == pytest.approx([0.12, 0.0, 0.1])
    y[1:].sum().backward()  # only the samples of rows 0 and 1
    assert quantizer.step.grad[2] == 0 and quantizer.step.grad[:2].abs().sum() > 0


def test_prescale_divides_channels_before_quantization():
    index = TimestepIndex(torch.tensor([0]))
    quantizer = ActQuantizer(index, rows=1, bits=8, symmetric=True, channel_dim=-1)
    quantizer.set_dilation(torch.tensor([1.0, 4.0]), prescale=True)
    assert quantizer(torch.tensor([[2.0, 2.0]])).tolist() == [[2.0, 0.5]]


def test_timestep_index_rows():
    index = TimestepIndex(torch.tensor([981, 961, 21, 1]))
    assert index.lookup(torch.tensor([999, 960, 0, 400, 600])).tolist() == [0, 1, 3, 2, 1]
    index.set_timesteps(torch.tensor([981, 1]))
    assert index.rows_for(4).tolist() == [0, 0, 3, 3]  # batch x heads, batch-major
    with pytest.raises(RuntimeError, match="does not split into the batch"):
        index.rows_for(3)
    with pytest.raises(ValueError, match="distinct values"):
        TimestepIndex(torch.tensor([1, 1]))
