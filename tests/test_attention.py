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
    quantized, _, _ = prepare(denoiser, torch.arange(0, 1000, 100), CalibConfig(quantize_attention=True))
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


def test_a_head_table_quantizes_each_head_with_its_own_step():
    from dilatequant.calibrate.quantizer import ActQuantizer, fake_quantize
    from dilatequant.calibrate.timesteps import TimestepIndex

    index = TimestepIndex(torch.tensor([0, 500]))
    quantizer = ActQuantizer(index, 2, 4, True, channel_dim=-1, heads=3)
    with torch.no_grad():
        quantizer.step.copy_(torch.tensor([[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]]))
    quantizer.enabled = True
    x = torch.randn(2, 3, 5, 4)  # [batch, heads, tokens, head_dim]
    index.set_timesteps(torch.tensor([500, 0]))  # sample 0 reads row 1, sample 1 row 0
    out = quantizer(x)
    for b, row in ((0, 1), (1, 0)):
        for h in range(3):
            expected = fake_quantize(x[b, h], quantizer.step[row, h].detach(), 0.0, quantizer.fmt)
            assert torch.equal(out[b, h], expected)


def test_head_tables_are_calibrated_per_head_and_survive_the_artifact(tiny_model_dirs, tmp_path):
    config = CalibConfig(quantize_attention=True, attention_head_tables=True, bkd_iters=5, bkd_batch=8, **TINY)
    path = calibrate(tiny_model_dirs["dit"], config, tmp_path / "a", progress=False)
    denoiser = load_artifact(path).model.denoiser
    attentions = [m for m in denoiser.modules() if isinstance(m, Attention)]
    keys = [q for name, q in denoiser.act_quantizers().items() if name.endswith(".attn_k")]
    assert len(keys) == len(attentions) > 0 and attentions[0].heads > 1
    assert all(q.step.shape == (5, attentions[0].heads) for q in keys)
    assert all(not torch.allclose(q.step[:, 0], q.step[:, 1]) for q in keys)  # each head got its own range
    probs = [q for name, q in denoiser.act_quantizers().items() if name.endswith(".attn_probs")]
    assert all(float(q.step.detach().max()) * q.fmt.qmax <= 1.0 + 1e-6 for q in probs)


def test_head_tables_without_attention_quantization_are_refused():
    from dilatequant.core.errors import UserError

    with pytest.raises(UserError, match="attention_head_tables=True would not run"):
        CalibConfig(attention_head_tables=True)


def test_log_sqrt2_softmax_outputs_survive_the_artifact_and_reach_the_probabilities(tiny_model_dirs, tmp_path):
    """RepQuant's softmax quantizer: the probabilities the attention multiplies by V sit on 2^(-q/2) levels."""
    from dilatequant.calibrate.log_sqrt2 import LogSqrt2Quantizer
    from dilatequant.calibrate.recipes import recipe

    config = recipe("repquant", quantize_attention=True, bkd_iters=0, reparam_iters=2, **TINY)
    assert config.softmax_quantizer == "log-sqrt2" and recipe("repquant").softmax_quantizer == "log-sqrt2"
    path = calibrate(tiny_model_dirs["dit"], config, tmp_path / "a", progress=False)
    artifact = load_artifact(path)
    assert artifact.record.recipe["parts"]["softmax_format"] == "log-sqrt2"
    denoiser = artifact.model.denoiser
    logs = [m for m in denoiser.modules() if isinstance(m, LogSqrt2Quantizer)]
    assert len(logs) == len([m for m in denoiser.modules() if isinstance(m, Attention)]) > 0 and all(q.enabled for q in logs)
    assert not any(name.endswith(".attn_probs") for name in denoiser.act_quantizers())  # no table to calibrate
    seen = []
    handle = logs[0].register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(2, *denoiser.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoiser(x, torch.tensor([10, 900]), denoiser.conditioning(torch.tensor([1, 2])))
    handle.remove()
    levels = -2 * seen[0][seen[0] > 0].double().log2()
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.max() <= 2**8 - 1
