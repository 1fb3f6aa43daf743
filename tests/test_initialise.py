"""Per-timestep initialisation: each row is set from its own timestep's samples."""

import pytest
import torch

from dilatequant.calibrate.initialise import RowObserver
from dilatequant.calibrate.quantizer import ActQuantizer
from dilatequant.calibrate.timesteps import TimestepIndex


def observed(method: str, symmetric: bool = True, rows_seen=(0, 1, 2), bits: int = 8) -> ActQuantizer:
    """Rows 0/1/2 see Laplace data of scale 1/10/100 (long tails); row 3 (t=0) sees none."""
    index = TimestepIndex(torch.tensor([999, 600, 300, 0]))
    quantizer = ActQuantizer(index, rows=4, bits=bits, symmetric=symmetric, channel_dim=1)
    observer = RowObserver(quantizer, 99.0 if method == "percentile" else None)
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([[999, 600, 300][r] for r in rows_seen for _ in range(4)])
    amplitude = torch.tensor([[1.0, 10.0, 100.0][r] for r in rows_seen for _ in range(4)]).view(-1, 1, 1, 1)
    uniform = torch.rand(len(t), 3, 8, 8, generator=generator).clamp(1e-6, 1 - 1e-6)
    x = -torch.sign(uniform - 0.5) * torch.log1p(-2 * (uniform - 0.5).abs()) * amplitude  # Laplace(0, amplitude)
    if not symmetric:
        x = x - 0.25 * x.amax()
    index.set_timesteps(t)
    observer.observe(x)
    if method == "mse":
        observer.observe_mse(x)
    observer.finish(method)
    return quantizer


def test_minmax_rows_follow_each_timesteps_own_range():
    steps = observed("minmax").step.detach()
    assert steps[0] < steps[1] < steps[2]
    assert steps[1] / steps[0] == pytest.approx(10, rel=0.5) and steps[2] / steps[1] == pytest.approx(10, rel=0.5)


def test_rows_without_samples_copy_the_nearest_timestep():
    steps = observed("minmax").step.detach()
    assert steps[3] == steps[2]  # t=0 is nearest to t=300


def test_mse_and_percentile_clip_below_minmax():
    minmax, mse, pct = (observed(m, bits=4).step.detach()[:3] for m in ("minmax", "mse", "percentile"))
    assert (mse < minmax).all()  # at 4 bits, a Laplace tail is worth clipping
    assert (pct < minmax).all()


def test_asymmetric_rows_have_integer_zero_points():
    quantizer = observed("minmax", symmetric=False)
    assert torch.equal(quantizer.zero_point, quantizer.zero_point.round()) and (quantizer.zero_point > 0).all()
