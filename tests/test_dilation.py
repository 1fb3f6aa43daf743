"""Weight Dilation: an exact equivalence that moves no per-output-channel weight range."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.dilation import column_maxima, dilation_factors
from dilatequant.calibrate.quant_model import prepare
from dilatequant.core.denoiser import load_model


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**16))
def test_factors_keep_every_output_channel_range_and_are_at_least_one(out_ch, in_ch, kernel, seed):
    weight = torch.randn(out_ch, in_ch, kernel, kernel, generator=torch.Generator().manual_seed(seed))
    s = dilation_factors([weight])
    dilated = weight * s.view(1, -1, 1, 1)
    assert (s >= 1).all()
    torch.testing.assert_close(column_maxima(dilated).amax(1), column_maxima(weight).amax(1))


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8), st.integers(2, 8), st.integers(0, 2**16))
def test_linear_equivalence_and_saturation(out_ch, in_ch, seed):
    generator = torch.Generator().manual_seed(seed)
    weight, x = torch.randn(out_ch, in_ch, generator=generator), torch.randn(5, in_ch, generator=generator)
    s = dilation_factors([weight])
    torch.testing.assert_close((x / s) @ (weight * s).T, x @ weight.T, rtol=1e-5, atol=1e-5)
    saturated = (weight.abs() == weight.abs().amax(1, keepdim=True)).any(0)
    assert torch.equal(s[saturated], torch.ones(int(saturated.sum())))
    assert (s[~saturated] > 1).all()


def test_zero_columns_and_the_cap():
    weight = torch.tensor([[1.0, 0.0, 1e-6], [0.5, 0.0, 1e-6]])
    assert dilation_factors([weight]).tolist() == pytest.approx([1.0, 1.0, 5e5], rel=1e-3)
    assert dilation_factors([weight], cap=100.0).tolist() == pytest.approx([1.0, 1.0, 100.0])


def test_shared_input_layers_get_one_vector_valid_for_all():
    a, b = torch.tensor([[4.0, 1.0]]), torch.tensor([[1.0, 2.0]])
    s = dilation_factors([a, b])  # column 1: min(4/1, 2/2) = 1 -> saturated by b
    assert s.tolist() == [1.0, 1.0]


def randomise_norms(model: torch.nn.Module) -> None:
    """Non-trivial affine norms, so exact folds into them are really exercised."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
            module.weight.data = torch.rand(module.weight.shape, generator=generator) + 0.5
            module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=generator)


@pytest.fixture(params=["unet", "unet-cond", "dit", "digits"])
def denoiser(request, tiny_model_dirs):
    loaded = load_model(tiny_model_dirs[request.param] if request.param != "digits" else "digits")
    randomise_norms(loaded.denoiser)
    return loaded.denoiser


def test_dilated_fp_model_computes_the_same_function(denoiser):
    quantized, records, _ = prepare(denoiser, torch.arange(0, 1000, 100), CalibConfig())
    quantized.set_quantization(activations=False, weights=False)
    x = torch.randn(3, *denoiser.sample_shape, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([10, 500, 990]), denoiser.conditioning(torch.tensor([1, 2, 3]))
    with torch.no_grad():
        expected, actual = denoiser(x, t, cond), quantized(x, t, cond)
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-5
    assert any(r.folded_into for r in records.values()), "no exact fold was exercised"
    assert any(not r.folded_into and (r.factors > 1).any() for r in records.values()), "no pre-scale was exercised"


def test_dilation_moves_no_weight_quantization_range(denoiser):
    quantized, records, _ = prepare(denoiser, torch.arange(0, 1000, 100), CalibConfig())
    original = dict(denoiser.model.named_modules())
    # A layer that received a fold (V before an attention output) has its rows divided by that group's s.
    row_scale = {r.folded_into: r.factors for r in records.values() if r.folded_into in original}
    for name, wrapper in quantized.quant_layers().items():
        before = column_maxima(original[name].weight).amax(1)
        after = column_maxima(wrapper.layer.weight).amax(1)
        torch.testing.assert_close(after, before / row_scale.get(name, 1.0), rtol=1e-5, atol=1e-8)
