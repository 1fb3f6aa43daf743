"""The seeded training scripts stay runnable: a few steps write a model the loaders accept."""

import json

import torch
from click.testing import CliRunner

from dilatequant.core.classifier import DigitsClassifier
from dilatequant.core.denoiser import load_model
from dilatequant.tools import train_classifier, train_digits


def test_train_digits_writes_a_loadable_model_atomically(tmp_path):
    out = tmp_path / "digits"
    args = ["--out", out, "--steps", 2, "--batch", 2, "--device", "cpu"]
    result = CliRunner().invoke(train_digits.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "training.json").read_text())
    assert record["steps_taken"] == 2 and record["seed"] == 0
    assert load_model(out).denoiser.sample_shape == (1, 32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no temporary directory left behind


def test_train_digits_dit_writes_a_loadable_dit_that_q_dit_can_group(tmp_path):
    out = tmp_path / "digits-dit"
    args = ["--out", out, "--arch", "digits-dit", "--steps", 1, "--batch", 2, "--device", "cpu"]
    result = CliRunner().invoke(train_digits.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    loaded = load_model(out)
    assert loaded.denoiser.family == "dit" and loaded.denoiser.sample_shape == (1, 32, 32)
    assert json.loads((out / "training.json").read_text())["arch"] == "digits-dit"
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_size <= 25 * 2**20  # the size limit, in fp16
    widths = {m.in_features for m in loaded.denoiser.model.modules() if isinstance(m, torch.nn.Linear)}
    assert all(width % g == 0 for width in widths for g in (32, 64, 128))  # every Linear allows Q-DiT's group sizes


def test_train_classifier_writes_a_loadable_classifier(tmp_path):
    result = CliRunner().invoke(train_classifier.main, ["--out", str(tmp_path), "--epochs", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "config.json").read_text())
    assert 0 <= config["heldout_accuracy"] <= 1
    assert DigitsClassifier.from_pretrained(tmp_path).head.out_features == 10


def test_training_lr_schedule_warms_up_then_decays():
    peak = 1e-3
    assert train_digits.lr_at(0, peak, 10, 100) == peak / 10
    assert train_digits.lr_at(9, peak, 10, 100) == peak
    assert train_digits.lr_at(100, peak, 10, 100) == peak * 0.1
