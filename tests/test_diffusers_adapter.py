"""Engines as a drop-in diffusers denoiser (issue 17, part 2): a DDIM pipeline generates through them, and the
adapter takes each family's call signature and returns its output type."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers.utils import BaseOutput
from tiny_models import TINY_CONFIGS, build_model

from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.contract import load_artifact
from dilatequant.calibrate.flow import calibrate
from dilatequant.core.errors import UserError
from dilatequant.core.sampling import SamplerConfig, sample
from dilatequant.engines.config import BuildConfig
from dilatequant.engines.diffusers_adapter import DiffusersDenoiser, as_diffusers
from dilatequant.engines.engine import build
from dilatequant.export.config import ExportConfig
from dilatequant.export.flow import export

TINY = {"samples": 16, "trajectories": 8, "steps": 4}


def deployed(model, root):
    """W8A8 min/max calibration (DDIM 4-step grid), its ort-cpu export in 2 buckets and ONNX Runtime engines."""
    calib = calibrate(model, CalibConfig.from_bits("W8A8", method="minmax", **TINY), root / "calib", progress=False)
    engines = build(export(calib, ExportConfig(buckets=2, profile="ort-cpu"), root / "export", progress=False),
                    BuildConfig(fidelity="off"), root / "engines")  # fmt: skip
    return load_artifact(calib), engines


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((a - b) ** 2), 1e-12)))


def test_a_ddim_pipeline_generates_through_the_engines_like_through_the_fake_quant_model(tmp_path):
    name, config, _ = TINY_CONFIGS["unet"]
    model = build_model((name, {k: v for k, v in config.items() if k != "num_class_embeds"}, None), tmp_path / "model")
    artifact, engines = deployed(model, tmp_path)
    scheduler = diffusers.DDIMScheduler.from_config(artifact.model.scheduler_config)
    images = {}
    for kind, unet in (("fake-quant", DiffusersDenoiser(artifact.model.denoiser)), ("engines", as_diffusers(engines))):
        pipe = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        images[kind] = pipe(batch_size=4, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images["engines"].shape == (4, 16, 16, 1)
    # The adapter adds nothing: the pipeline's images are dilatequant's own sampler's, through the same denoiser
    # from the same noise (DDIM, eta 0; the pipeline draws it as initial_noise does).
    for kind, denoiser in (("fake-quant", artifact.model.denoiser), ("engines", as_diffusers(engines).runtime)):
        own = sample(denoiser, artifact.model.scheduler_config, torch.zeros(4, dtype=torch.long), SamplerConfig(steps=4), progress=False)
        np.testing.assert_allclose(images[kind], (own / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-5)
    # Engines against the fake-quant model: 26.5 dB on these random weights (rounding flips spread through 4 steps).
    assert psnr(images["engines"], images["fake-quant"]) > 20


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_the_adapter_takes_the_model_signature_and_returns_its_output_type(family, tiny_model_dirs, tmp_path):
    """UNet2DModel's (sample, timestep, class_labels) and DiT's (hidden_states, timestep, class_labels), a 0-d
    timestep as pipelines pass it, `.sample` or a tuple, and exactly the engines' eps."""
    artifact, engines = deployed(tiny_model_dirs[family], tmp_path)
    adapter = as_diffusers(engines)
    shape = artifact.model.denoiser.sample_shape
    x, labels = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2, 3])
    t = torch.tensor(int(artifact.record.timesteps[-1]))  # a calibrated timestep, 0-d
    name = "sample" if family == "unet" else "hidden_states"
    got = adapter(**{name: x}, timestep=t, class_labels=labels)
    assert isinstance(got, BaseOutput) and torch.equal(got.sample, adapter(**{name: x}, timestep=t, class_labels=labels, return_dict=False)[0])
    channels = shape[0]
    torch.testing.assert_close(got.sample[:, :channels], adapter.runtime(x, t.expand(3), labels), rtol=0, atol=0)
    assert got.sample.shape[1] == artifact.model.denoiser.config.out_channels  # the exported model's output width
    if family == "dit":  # learned variance: eps, then zeros for the half DiT pipelines discard
        assert got.sample.shape[1] == 2 * channels and not got.sample[:, channels:].any()
    assert (adapter.config.in_channels, adapter.dtype, adapter.device.type) == (channels, torch.float32, "cpu")
    with pytest.raises(UserError, match="class-conditional"):
        adapter(**{name: x}, timestep=t)
