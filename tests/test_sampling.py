import pytest
import torch

from dilatequant.core.denoiser import load_model
from dilatequant.core.errors import UserError
from dilatequant.core.sampling import SCHEDULERS, SamplerConfig, balanced_labels, default_batch_size, sample


@pytest.fixture(scope="module")
def tiny_unet(tiny_model_dirs):
    return load_model(tiny_model_dirs["unet"])


def run(loaded, n=6, **config):
    return sample(loaded.denoiser, loaded.scheduler_config, balanced_labels(n), SamplerConfig(**config), progress=False)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_same_seed_same_images(tiny_unet, scheduler):
    first, second = run(tiny_unet, scheduler=scheduler, steps=4), run(tiny_unet, scheduler=scheduler, steps=4)
    assert torch.equal(first, second)
    assert first.shape == (6, 1, 16, 16) and first.abs().max() <= 1


def test_other_seed_other_images(tiny_unet):
    assert not torch.allclose(run(tiny_unet, steps=4, seed=0), run(tiny_unet, steps=4, seed=1))


def test_deterministic_samplers_do_not_depend_on_batch_size(tiny_unet):
    whole = run(tiny_unet, steps=4, batch_size=6)
    split = run(tiny_unet, steps=4, batch_size=4)
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=0)


def test_every_family_samples(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    images = run(loaded, n=3, steps=2)
    assert images.shape == (3, *loaded.denoiser.sample_shape) and torch.isfinite(images).all()


@pytest.mark.parametrize(
    ("config", "message"),
    [({"scheduler": "euler"}, "Unknown scheduler 'euler'"), ({"steps": 0}, "steps and batch_size must be >= 1")],
)
def test_bad_sampler_config(config, message):
    with pytest.raises(UserError, match=message):
        SamplerConfig(**config)


def test_balanced_labels():
    assert balanced_labels(12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_default_batch_size_follows_the_device():
    assert default_batch_size("cpu") == 32 and default_batch_size("cuda") == 500
