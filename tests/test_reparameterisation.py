"""RepQuant's post-norm reparameterisation: per-channel codes equal per-tensor codes, and folding keeps the FP model."""

import pytest
import torch
from torch import nn

from dilatequant.calibrate.quantizer import IntFormat
from dilatequant.calibrate.reparameterisation import ChannelClipQuantizer, Reparameterisation, fold, learn_clipping
from dilatequant.core.denoiser import load_model
from dilatequant.core.sampling import balanced_labels
from dilatequant.core.structure import input_groups, post_norm_sites


def random_bounds(channels: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.rand(channels, generator=generator, dtype=torch.float64) * 4 - 3  # some ranges hold no 0
    return lo, lo + 0.2 + torch.rand(channels, generator=generator, dtype=torch.float64) * 4


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("shared_zero", [False, True])
def test_the_per_tensor_codes_equal_the_per_channel_codes_bit_for_bit(bits, shared_zero):
    generator = torch.Generator().manual_seed(bits)
    quantizer = ChannelClipQuantizer(*random_bounds(64, generator), bits, shared_zero).double()
    x = torch.randn(4096, 64, generator=generator, dtype=torch.float64) * 3  # inside and outside every range
    rep = Reparameterisation.of(quantizer)
    per_channel, per_tensor = quantizer.codes(x), rep.codes(x, IntFormat(bits, symmetric=False))
    assert torch.equal(per_channel, per_tensor)
    assert 0 < per_channel.float().mean() < 2**bits - 1  # not all clamped to one end
    assert rep.zero_point == rep.zero_point.round() and 0 <= rep.zero_point <= 2**bits - 1  # an ONNX uint8 zero point
    assert not rep.offset.any() if shared_zero else rep.offset.abs().max() > 0


def model_output(loaded, generator_seed: int = 0) -> torch.Tensor:
    denoiser = loaded.denoiser
    generator = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(2, *denoiser.sample_shape, generator=generator)
    with torch.no_grad():
        return denoiser(x, torch.tensor([10, 700]), denoiser.conditioning(balanced_labels(2)))


def fold_random(loaded, seed: int = 0) -> dict[str, Reparameterisation]:
    """Fold a random scale (and, where every consumer has a bias, offset) into every post-norm site."""
    model, generator = loaded.denoiser.model, torch.Generator().manual_seed(seed)
    modules, layers = dict(model.named_modules()), {g.name: g.layers for g in input_groups(model)}
    sites, _ = post_norm_sites(model)
    folded = {}
    for group, (_, predecessor) in sites.items():
        consumers = [modules[name] for name in layers[group]]
        channels = consumers[0].weight.shape[1]
        offsets = all(layer.bias is not None for layer in consumers)
        rep = Reparameterisation(0.5 + 1.5 * torch.rand(channels, generator=generator),
                                 torch.randn(channels, generator=generator) * offsets, torch.tensor(0.1), torch.tensor(128.0))  # fmt: skip
        fold(predecessor, consumers, rep)
        folded[group] = rep
    return folded


@pytest.fixture(params=["unet", "unet-cond", "dit", "digits-dit"])
def model_spec(request, tiny_model_dirs):
    return tiny_model_dirs.get(request.param, request.param)


def test_folding_at_every_post_norm_site_keeps_the_fp_function(model_spec):
    loaded = load_model(model_spec)
    before = model_output(loaded)
    folded = fold_random(loaded)
    assert folded  # every family has post-norm inputs
    after = model_output(loaded)
    assert (after - before).norm() / before.norm() < 1e-5


def test_dit_post_norm_inputs_fold_into_the_adaln_modulation(tiny_model_dirs):
    model = load_model(tiny_model_dirs["dit"]).denoiser.model
    sites, refused = post_norm_sites(model)
    blocks = len(model.transformer_blocks)
    assert {g: p for g, (p, _) in sites.items()} == {
        **{f"transformer_blocks.{i}.attn1.qkv": f"transformer_blocks.{i}.norm1.linear" for i in range(blocks)},
        **{f"transformer_blocks.{i}.ff.net.0.proj": f"transformer_blocks.{i}.norm1.linear" for i in range(blocks)},
    }
    assert refused == {}


def test_after_folding_the_consumer_sees_the_per_tensor_grid(tiny_model_dirs):
    """The activation a consumer reads after the fold is X / r - b of the one it read before."""
    loaded = load_model(tiny_model_dirs["dit"])
    consumer = loaded.denoiser.model.transformer_blocks[0].ff.net[0].proj
    seen = []
    handle = consumer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    model_output(loaded)
    rep = fold_random(loaded)["transformer_blocks.0.ff.net.0.proj"]
    model_output(loaded)
    handle.remove()
    torch.testing.assert_close(seen[1], seen[0] / rep.scale - rep.offset, rtol=1e-5, atol=1e-5)


def test_a_norm_without_affine_weights_is_refused_by_name(tiny_model_dirs):
    model = load_model(tiny_model_dirs["unet-cond"]).denoiser.model
    block_name, block = next((n, m) for n, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock")
    block.norm3 = nn.LayerNorm(block.norm3.normalized_shape, elementwise_affine=False)
    sites, refused = post_norm_sites(model)
    assert f"{block_name}.ff.net.0.proj" not in sites
    assert refused == {f"{block_name}.ff.net.0.proj": f"nothing to fold into after {block_name}.norm3: it has no affine weights"}


def test_an_offset_needs_a_consumer_bias():
    layer = nn.Linear(4, 3, bias=False)
    rep = Reparameterisation(torch.ones(4), torch.ones(4), torch.tensor(0.1), torch.tensor(0.0))
    with pytest.raises(ValueError, match="without a bias cannot absorb the offsets"):
        fold(lambda s, offset=None: None, [layer], rep)


def test_learned_clipping_lowers_the_consumer_output_error():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=generator) * torch.linspace(0.2, 3, 32) + torch.linspace(-2, 2, 32)
    x[::97, 5] = 40.0  # one outlier channel: its min/max grid is coarse
    layer = nn.Linear(32, 16)
    untrained, trained = learn_clipping(x, [layer], 4, False, iters=0), learn_clipping(x, [layer], 4, False, iters=200)

    def error(quantizer):
        with torch.no_grad():
            return (torch.nn.functional.linear(quantizer(x), layer.weight) - torch.nn.functional.linear(x, layer.weight)).pow(2).mean()

    assert error(trained) < 0.8 * error(untrained)


@pytest.mark.parametrize("name", ["repquant", "dilatequant-repquant"])  # alone, and after dilation (DiT: pre-scales folded too)
def test_a_reparameterised_artifact_keeps_the_fp_function(tiny_model_dirs, tmp_path, name):
    from dilatequant.calibrate.artifact import load_artifact
    from dilatequant.calibrate.flow import calibrate
    from dilatequant.calibrate.recipes import recipe

    source = load_model(tiny_model_dirs["dit"])
    config = recipe(name, "W8A8", samples=16, trajectories=4, steps=4, bkd_iters=0, reparam_iters=5)
    artifact = load_artifact(calibrate(tiny_model_dirs["dit"], config, tmp_path / "calib", "cpu", progress=False))
    model = artifact.model
    model.denoiser.set_quantization(activations=False, weights=False)
    before, after = model_output(source), model_output(model)
    assert (after - before).norm() / before.norm() < 1e-5
    statistics = artifact.record.statistics["reparameterisation"]
    assert set(statistics) == {f"transformer_blocks.{i}.{g}" for i in range(2) for g in ("attn1.qkv", "ff.net.0.proj")}
    assert all(s["offsets"] and s["folded_into"].endswith("norm1.linear") for s in statistics.values())
    assert "post-norm-reparameterisation" in artifact.record.recipe["parts"]["transforms"]
    notes = {row["layer"]: row["note"] for row in artifact.plan["layers"]}
    assert "post-norm reparameterisation folded into transformer_blocks.0.norm1.linear" in notes["transformer_blocks.0.attn1.to_q"]
    if config.dilation:  # the DiT's pre-scales went into the modulation with the reparameterisation
        assert artifact.plan["groups"]["transformer_blocks.0.attn1.qkv"]["folded_into"] == "transformer_blocks.0.norm1.linear"


def test_a_post_norm_input_that_cannot_fold_is_refused_by_name(tiny_model_dirs):
    from dilatequant.calibrate.calib_data import CalibrationData
    from dilatequant.calibrate.config import CalibConfig
    from dilatequant.calibrate.reparameterisation import reparameterise_post_norm
    from dilatequant.core.errors import UserError

    denoiser = load_model(tiny_model_dirs["unet-cond"]).denoiser
    block_name, block = next((n, m) for n, m in denoiser.model.named_modules() if type(m).__name__ == "BasicTransformerBlock")
    block.norm3 = nn.LayerNorm(block.norm3.normalized_shape, elementwise_affine=False)
    data = CalibrationData(torch.zeros(1, *denoiser.sample_shape), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(UserError, match=f"cannot rewrite {block_name}.ff.net.0.proj \\(nothing to fold into after {block_name}.norm3"):
        reparameterise_post_norm(denoiser, input_groups(denoiser.model), {}, data, CalibConfig(reparameterise=True), 1)


def test_reparameterisation_and_dynamic_inputs_are_refused_together():
    from dilatequant.calibrate.config import CalibConfig
    from dilatequant.core.errors import UserError

    with pytest.raises(UserError, match="reparameterise=True rewrites post-norm inputs"):
        CalibConfig(method="q-dit", reparameterise=True)
