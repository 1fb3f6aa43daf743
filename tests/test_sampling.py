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


class Killed(Exception):
    pass


class Counted:
    """A denoiser that counts its calls and dies (as if killed) after `die_after` of them."""

    def __init__(self, denoiser, die_after: float = float("inf")):
        self.denoiser, self.die_after, self.calls = denoiser, die_after, 0
        self.sample_shape, self.conditioning = denoiser.sample_shape, denoiser.conditioning

    def __call__(self, *args):
        self.calls += 1
        if self.calls > self.die_after:
            raise Killed
        return self.denoiser(*args)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])  # ddpm: the per-step noise generator resumes too
def test_a_killed_run_goes_on_from_its_checkpoint(tiny_unet, tmp_path, scheduler):
    config, labels, path = SamplerConfig(scheduler=scheduler, steps=3, batch_size=2), balanced_labels(6), tmp_path / "partial.pt"
    whole = sample(tiny_unet.denoiser, tiny_unet.scheduler_config, labels, config, progress=False)
    with pytest.raises(Killed):  # in the second of three batches
        sample(Counted(tiny_unet.denoiser, die_after=config.steps + 1), tiny_unet.scheduler_config, labels, config, progress=False, checkpoint=path)
    assert len(torch.load(path)["batches"]) == 1
    counted = Counted(tiny_unet.denoiser)
    resumed = sample(counted, tiny_unet.scheduler_config, labels, config, progress=False, checkpoint=path)
    assert counted.calls == 2 * config.steps  # the first batch was not sampled again
    assert torch.equal(resumed, whole)


def test_a_checkpoint_of_another_run_is_refused(tiny_unet, tmp_path):
    path = tmp_path / "partial.pt"
    sample(tiny_unet.denoiser, tiny_unet.scheduler_config, balanced_labels(2), SamplerConfig(steps=2), progress=False, checkpoint=path)
    with pytest.raises(UserError, match="holds batches of another sampling run"):
        sample(tiny_unet.denoiser, tiny_unet.scheduler_config, balanced_labels(2), SamplerConfig(steps=3), progress=False, checkpoint=path)
