import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilatequant.core.digits_data import train_heldout_split
from dilatequant.core.metrics import DigitsMetrics, frechet_distance, gaussian_stats, psnr_vs_ref


def test_frechet_distance_of_identical_sets_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 16))
    stats = gaussian_stats(features)
    assert frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 8))
    sigma = a @ a.T + np.eye(8)
    shift = rng.normal(size=8)
    assert frechet_distance(np.zeros(8), sigma, shift, sigma) == pytest.approx(shift @ shift, rel=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(0.01, 100), min_size=1, max_size=6),
    st.lists(st.floats(0.01, 100), min_size=1, max_size=6),
    st.floats(-10, 10),
)
def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians(var1, var2, shift):
    d = min(len(var1), len(var2))
    v1, v2 = np.array(var1[:d]), np.array(var2[:d])
    mu2 = np.full(d, shift)
    expected = d * shift**2 + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(np.zeros(d), np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_frechet_distance_survives_singular_covariances():
    features = np.random.default_rng(2).normal(size=(5, 16))  # fewer samples than dimensions
    assert np.isfinite(frechet_distance(*gaussian_stats(features), *gaussian_stats(features + 1.0)))


def test_psnr_of_a_known_error():
    ref = torch.zeros(4, 1, 8, 8)
    images = ref + 0.02  # MSE 4e-4 on a peak-to-peak range of 2 -> 10*log10(4/4e-4) = 40 dB
    assert psnr_vs_ref(images, ref) == pytest.approx(40.0, abs=1e-6)


def test_psnr_rejects_unpaired_shapes():
    with pytest.raises(ValueError, match="paired images of one shape"):
        psnr_vs_ref(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8))


@pytest.fixture(scope="module")
def metrics():
    return DigitsMetrics()


def test_bundled_classifier_heldout_accuracy_is_at_least_097(metrics):
    _, (images, labels) = train_heldout_split()
    assert metrics.evaluate(images, labels)["class_accuracy"] >= 0.97


def test_metrics_tell_real_digits_from_noise_and_wrong_labels(metrics):
    _, (images, labels) = train_heldout_split()
    real = metrics.evaluate(images, labels)
    noise = metrics.evaluate(torch.rand_like(images) * 2 - 1, labels)
    shuffled = metrics.evaluate(images, labels.roll(1))
    assert real["fid_digits"] < 0.1 * noise["fid_digits"]
    assert shuffled["class_accuracy"] < 0.2
