"""Model folders as users save them with diffusers (issue 17, part 3): the scheduler config beside the weights is
used, a missing one is an error naming what to add unless --scheduler names one, only the denoiser's weight files
count, warnings are one line, and eval on a model without a bundled metric says so."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from dilatequant.core.denoiser import load_model, model_fingerprint
from dilatequant.core.errors import ModelLoadError
from dilatequant.tools.inspection import inspect_model


def plain_folder(tiny_model_dirs, tmp_path: Path, scheduler: bool) -> Path:
    """The tiny UNet saved as users do: config.json, weights and (optionally) scheduler_config.json side by side."""
    folder = shutil.copytree(tiny_model_dirs["unet"], tmp_path / "plain", ignore=shutil.ignore_patterns("scheduler"))
    if scheduler:
        diffusers.DDIMScheduler(num_train_timesteps=500, beta_schedule="scaled_linear").save_pretrained(folder)
    return folder


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dilatequant.tools.cli", *args], capture_output=True, text=True, timeout=300)


def test_the_scheduler_config_beside_the_weights_is_used(tiny_model_dirs, tmp_path):
    loaded = load_model(plain_folder(tiny_model_dirs, tmp_path, scheduler=True))
    assert (loaded.scheduler_config["num_train_timesteps"], loaded.scheduler_config["beta_schedule"]) == (500, "scaled_linear")


def test_a_missing_scheduler_is_an_error_naming_what_to_add_unless_a_schedule_is_assumed(tiny_model_dirs, tmp_path):
    folder = plain_folder(tiny_model_dirs, tmp_path, scheduler=False)
    with pytest.raises(ModelLoadError, match=r"No scheduler config .*scheduler_config.json.*--scheduler"):
        load_model(folder)
    with pytest.warns(UserWarning, match="default DDPM schedule"):
        assert load_model(folder, assume_schedule=True).scheduler_config["num_train_timesteps"] == 1000


def test_only_the_denoisers_weight_files_count(tiny_model_dirs, tmp_path):
    folder = plain_folder(tiny_model_dirs, tmp_path, scheduler=True)
    before = (inspect_model(folder), model_fingerprint(folder))
    save_file({"w": torch.zeros(1000)}, folder / "text_encoder_lora.safetensors")  # a user's extra file
    after = inspect_model(folder)
    assert after["parameters"] == before[0]["parameters"] and [f["file"] for f in after["weights"]] == ["diffusion_pytorch_model.safetensors"]
    assert after["not_weights"] == ["text_encoder_lora.safetensors"] and model_fingerprint(folder) == before[1]
    (folder / "scheduler_config.json").unlink()
    assert inspect_model(folder)["scheduler"].startswith("missing: sample, eval, calibrate and export refuse")


def test_the_cli_refuses_a_model_without_a_schedule_and_with_scheduler_warns_in_one_line(tiny_model_dirs, tmp_path):
    folder = plain_folder(tiny_model_dirs, tmp_path, scheduler=False)
    args = ["sample", "--model", str(folder), "--n", "2", "--steps", "2", "--out", str(tmp_path / "grid.png")]
    refused = cli(*args)
    assert refused.returncode == 1 and refused.stderr.count("Error:") == 1 and "scheduler_config.json" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "grid.png").exists()
    done = cli(*args, "--scheduler", "ddim")
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "default DDPM schedule" in line]
    assert len(warned) == 1 and warned[0].startswith("Warning: No scheduler config") and "warnings.warn" not in done.stderr


def test_eval_of_a_model_without_a_bundled_metric_says_so_and_reports_psnr_against_a_reference(tiny_model_dirs):
    model = str(tiny_model_dirs["unet"])
    result = cli("eval", "--model", model, "--ref", model, "--n", "2", "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["psnr_vs_ref"] >= 99  # the same model from the same noise
    notes = [line for line in result.stderr.splitlines() if line.startswith("Note: no bundled quality metric")]
    assert len(notes) == 1 and "psnr_vs_ref compares it with the reference" in notes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model with its scheduler loads without any warning
        load_model(model)
