"""Optional quantization of the attention matmul inputs."""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from dilatequant.calibrate.artifact import load_artifact
from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.calibrate.quant_model import prepare
from dilatequant.core.denoiser import load_model

TINY = {"samples": 32, "trajectories": 8, "steps": 5}


@pytest.mark.parametrize("family", ["unet", "unet-cond", "dit"])
def test_explicit_attention_equals_diffusers_in_fp(tiny_model_dirs, family):
    denoiser = load_model(tiny_model_dirs[family]).denoiser
    quantized, _ = prepare(denoiser, torch.arange(0, 1000, 100), CalibConfig(quantize_attention=True))
    quantized.set_quantization(activations=False, weights=False)
    x = torch.randn(2, *denoiser.sample_shape, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([10, 900]), denoiser.conditioning(torch.tensor([1, 2]))
    with torch.no_grad():
        expected, actual = denoiser(x, t, cond), quantized(x, t, cond)
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-5
    assert any(name.endswith(".attn_probs") for name in quantized.act_quantizers())


def test_matmul_quantizers_survive_the_artifact(tiny_model_dirs, tmp_path):
    config = CalibConfig(quantize_attention=True, bkd_iters=5, bkd_batch=8, **TINY)
    path = calibrate(tiny_model_dirs["unet-cond"], config, tmp_path / "a", progress=False)
    denoiser = load_artifact(path).model.denoiser
    probs = [q for name, q in denoiser.act_quantizers().items() if name.endswith(".attn_probs")]
    attentions = [m for m in denoiser.modules() if isinstance(m, Attention)]
    assert len(probs) == len(attentions) > 0 and all(q.enabled and len(q.step) == 5 for q in probs)
    # softmax outputs lie in [0, 1]: their clipping range is at most 1
    assert all(float(q.step.detach().max()) * q.fmt.qmax <= 1.0 + 1e-6 for q in probs)
