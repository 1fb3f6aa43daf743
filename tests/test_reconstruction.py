"""Reconstruction parts (calibrate/reconstruction.py): FBR loss, QDrop mixing, learned rounding; and every
method recipe end to end on the tiny families."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.contract import load_artifact
from dilatequant.calibrate.flow import calibrate
from dilatequant.calibrate.quant_model import QuantLayer
from dilatequant.calibrate.quantizer import ActQuantizer, WeightQuantizer
from dilatequant.calibrate.recipes import METHODS, RECIPES
from dilatequant.calibrate.reconstruction import LR_SCHEDULES, LearnedRounding, RoundingWeights, cosine, fbr_loss, layer_outputs, qdrop_mix
from dilatequant.calibrate.timesteps import TimestepIndex
from dilatequant.core.errors import UserError
from dilatequant.export.config import ExportConfig
from dilatequant.export.flow import export
from dilatequant.export.profiles import PROFILES


def tiny_block(bits: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    index = TimestepIndex(torch.tensor([0]))

    def layer(i: int, o: int) -> QuantLayer:
        linear = nn.Linear(i, o)
        return QuantLayer(linear, ActQuantizer(index, 1, 8, True, -1), WeightQuantizer(linear.weight, bits, "minmax"))

    return nn.Sequential(layer(4, 6), nn.ReLU(), layer(6, 3))


def test_fbr_loss_is_the_block_mse_plus_the_weighted_layer_mses():
    block, fp = tiny_block(), tiny_block()
    with torch.no_grad():
        fp[0].layer.weight.add_(0.1)
    x = torch.randn(5, 4)
    with layer_outputs(block, ["0"]) as outputs:
        out = block(x)
    with layer_outputs(fp, ["0"]) as targets:
        target = fp(x)
    loss = fbr_loss(out, target, [outputs["0"]], [targets["0"]], 0.8)
    by_hand = ((out - target) ** 2).mean() + 0.8 * ((outputs["0"] - targets["0"]) ** 2).mean()
    assert torch.allclose(loss, by_hand) and loss > F.mse_loss(out, target)


def test_qdrop_takes_the_quantized_path_at_0_and_the_fp_path_at_1():
    q, fp = (torch.zeros(64, 8), {"temb": torch.zeros(64, 3)}), (torch.ones(64, 8), {"temb": torch.ones(64, 3)})
    generator = torch.Generator().manual_seed(0)
    assert qdrop_mix(q, fp, 0.0, generator)[0].eq(0).all() and qdrop_mix(q, fp, 1.0, generator)[1]["temb"].eq(1).all()
    half = qdrop_mix(q, fp, 0.5, generator)[0]
    assert 0.4 < float(half.mean()) < 0.6 and set(half.unique().tolist()) == {0.0, 1.0}


def test_hardened_learned_rounding_puts_each_weight_on_its_floor_or_ceiling():
    block = tiny_block(bits=4)
    layer = block[0]
    before = layer.layer.weight.detach().clone()
    scaled = before / layer.weight_quantizer.step.detach()[:, None]
    rounding = RoundingWeights(block, CalibConfig())
    assert isinstance(layer.weight_quantizer, LearnedRounding)
    with torch.no_grad():  # push every alpha to one side at random
        for r in rounding.roundings:
            r.alpha.copy_(torch.randn(r.alpha.shape, generator=torch.Generator().manual_seed(1)) * 3)
    chosen = rounding.roundings[0].alpha >= 0
    rounding.finish()
    assert isinstance(layer.weight_quantizer, WeightQuantizer)
    codes = layer.layer.weight.detach() / layer.weight_quantizer.step.detach()[:, None]
    expected = torch.clamp(scaled.floor() + chosen.float(), -8, 7)
    assert torch.equal(codes.round(), expected) and (codes - expected).abs().max() < 1e-4
    deployed = layer.weight_quantizer(layer.layer.weight) / layer.weight_quantizer.step.detach()[:, None]
    assert torch.equal(deployed.round(), expected)  # the restored quantizer reproduces the hardened codes


def test_learned_rounding_starts_at_the_weight():
    block = tiny_block(bits=8)
    weight = block[0].layer.weight.detach().clone()
    soft = LearnedRounding(weight, block[0].weight_quantizer)(weight)
    assert (soft - weight).abs().max() <= 1e-3 * block[0].weight_quantizer.step.max()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["unet", "unet-cond", "dit"])
def test_every_method_calibrates_round_trips_and_exports_in_both_profiles(tiny_model_dirs, tmp_path, family, method):
    tiny = {"samples": 8, "trajectories": 8, "steps": 4, "bkd_batch": 4}
    iters = {"bkd_iters": 3} if RECIPES[method].distills else {}
    groups = {"weight_group_size": 4} if method == "q-dit" else {}  # the tiny models' Linear layers are 8-32 wide
    config = CalibConfig.from_bits("W4A8", method=method, **tiny, **iters, **groups)
    path = calibrate(tiny_model_dirs[family], config, tmp_path / "c", progress=False)
    artifact = load_artifact(path)
    assert artifact.config == config
    record = json.loads((path / "calibration.json").read_text())
    assert record["recipe"]["method"] == method
    if method == "eda-dm":
        assert record["recipe"]["parts"]["transforms"] == []
        assert (record["recipe"]["parts"]["loss"], record["recipe"]["parts"]["weight_rounding"]) == ("fbr", "learned-rounding")
        assert len(artifact.act_table(artifact.groups()[0])[0]) == 1  # one shared range, no TPQ
    if method == "q-dit":
        assert record["recipe"]["parts"]["weight_format"] == "group-wise" and record["recipe"]["parts"]["act_format"] == "dynamic"
        # deployable as MatMulNBits in groups of 16-256 (tests/test_group_export.py); the tiny models need groups of 4
        with pytest.raises(UserError, match="static scales only"):
            export(path, ExportConfig(buckets=2), tmp_path / "refused")
        with pytest.raises(UserError, match="group size 4 cannot be deployed as MatMulNBits"):
            export(path, ExportConfig(buckets=2, profile="ort-dynamic"), tmp_path / "refused")
        return
    for profile in PROFILES if family == "unet" else ():  # exports of every family: tests/test_export.py
        assert (export(path, ExportConfig(buckets=2, profile=profile, fp32=True), tmp_path / profile) / "bucket_1.onnx").is_file()


def test_cosine_schedule_anneals_from_the_base_rate_to_zero():
    assert [round(cosine(k, 4), 6) for k in range(5)] == [1.0, 0.853553, 0.5, 0.146447, 0.0]
    assert LR_SCHEDULES["constant"] is None and RECIPES["eda-dm"].settings["bkd_lr_schedule"] == "cosine"
