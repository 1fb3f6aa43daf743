import json
import shutil

import pytest
import torch
from diffusers import UNet2DModel

from dilatequant.core.denoiser import load_model
from dilatequant.core.errors import ModelLoadError
from dilatequant.core.zoo import zoo_path


def test_bundled_digits_loads_with_plain_diffusers():
    model = UNet2DModel.from_pretrained(zoo_path("digits"))
    assert (model.config.sample_size, model.config.in_channels, model.config.num_class_embeds) == (32, 1, 10)
    assert sum(p.numel() for p in model.parameters()) > 1e6


def test_bundled_digits_has_attention_at_16_and_8():
    config = UNet2DModel.load_config(zoo_path("digits"))
    assert config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]


def test_load_by_zoo_name_reads_scheduler_and_weights_in_float32():
    loaded = load_model("digits")
    assert loaded.denoiser.family == "unet"
    assert loaded.denoiser.sample_shape == (1, 32, 32)
    assert loaded.scheduler_config["num_train_timesteps"] == 1000
    assert next(loaded.denoiser.parameters()).dtype == torch.float32


@pytest.mark.parametrize(
    ("family", "shape"), [("unet", (1, 16, 16)), ("unet-cond", (4, 16, 16)), ("dit", (4, 8, 8))]
)
def test_each_family_loads_and_predicts_noise_of_the_input_shape(tiny_model_dirs, family, shape):
    loaded = load_model(tiny_model_dirs[family])
    assert loaded.denoiser.family == family and loaded.denoiser.sample_shape == shape
    labels = torch.tensor([0, 3])
    eps = loaded.denoiser(torch.randn(2, *shape), torch.tensor([10, 900]), loaded.denoiser.conditioning(labels))
    assert eps.shape == (2, *shape)


def test_cross_attention_conditioning_is_fixed_per_class(tiny_model_dirs):
    denoiser = load_model(tiny_model_dirs["unet-cond"]).denoiser
    a, b = denoiser.conditioning(torch.tensor([1, 2])), denoiser.conditioning(torch.tensor([1, 2]))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_hub_id_gets_an_offline_error():
    with pytest.raises(ModelLoadError, match="works offline.*local directory"):
        load_model("runwayml/stable-diffusion-v1-5")


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="nor an existing local path"):
        load_model(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(tmp_path / "model.safetensors")


def test_directory_without_config_lists_what_it_found(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"No config.json.*found: weights.bin"):
        load_model(tmp_path)


def test_unsupported_model_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ModelLoadError, match="'AutoencoderKL'.*Supported denoisers: UNet2DModel"):
        load_model(tmp_path)


def test_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="Cannot read .*config.json"):
        load_model(tmp_path)


def test_missing_weights(tiny_model_dirs, tmp_path):
    shutil.copy(tiny_model_dirs["unet"] / "config.json", tmp_path / "config.json")
    shutil.copytree(tiny_model_dirs["unet"] / "scheduler", tmp_path / "scheduler")
    with pytest.raises(ModelLoadError, match="Cannot load the UNet2DModel weights"):
        load_model(tmp_path)
