"""RepQuant's softmax quantizer: log√2 levels, and their rewrite into shift-only log2 products plus one √2."""

import math

import pytest
import torch

from dilatequant.calibrate.log_sqrt2 import log2_matmul, log2_shifts, log_sqrt2_codes, log_sqrt2_dequantize, log_sqrt2_quantize


def probabilities(shape, seed=0) -> torch.Tensor:
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4
    probs = scores.softmax(-1)
    probs[..., 0] = 0.0  # masked positions exist
    return probs


def test_levels_are_half_powers_of_two_and_round_in_the_log_domain():
    a = torch.tensor([1.0, 2**-0.5, 0.5, 0.6, 2**-3.5, 1e-12, 0.0], dtype=torch.float64)
    codes, zero = log_sqrt2_codes(a, bits=4)
    assert codes.tolist()[:5] == [0, 1, 2, 1, 7]  # 0.6: -2·log2(0.6) = 1.47 rounds to 1
    assert zero.tolist() == [False] * 5 + [True, True]  # below 2^(-15/2) and exact zeros dequantize to 0
    assert log_sqrt2_dequantize(codes, zero).tolist() == [1.0, 2**-0.5, 0.5, 2**-0.5, 2**-3.5, 0.0, 0.0]


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_the_log_sqrt2_error_is_within_a_quarter_octave(bits):
    a = probabilities((8, 64), seed=bits)
    codes, zero = log_sqrt2_codes(a, bits)
    kept = ~zero & (a > 0)
    ratio = log_sqrt2_quantize(a, bits)[kept] / a[kept]
    assert ratio.log2().abs().max() <= 0.25 + 1e-12  # round(-2 log2 a) is off by at most 1/2 code = 1/4 octave


@pytest.mark.parametrize("bits", [4, 8])
def test_the_log2_rewrite_equals_the_log_sqrt2_product(bits):
    probs, v = probabilities((2, 3, 16, 16)), torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    codes, zero = log_sqrt2_codes(probs, bits, delta=1.0)
    reference = log_sqrt2_dequantize(codes, zero) @ v
    torch.testing.assert_close(log2_matmul(codes, zero, v), reference, rtol=1e-12, atol=1e-12)
    even, odd = log2_shifts(codes, zero)
    for part in (even, odd):  # bit shifts only: every nonzero multiplier is an integer power of two
        exponents = part[part > 0].log2()
        assert torch.equal(exponents, exponents.round())
    assert not ((even > 0) & (odd > 0)).any()


def test_a_calibrated_delta_scales_every_level():
    a = torch.tensor([0.4, 0.1, 0.02], dtype=torch.float64)
    codes, zero = log_sqrt2_codes(a, 4, delta=0.4)
    assert codes[0] == 0 and math.isclose(log_sqrt2_dequantize(codes, zero, 0.4)[0].item(), 0.4)
