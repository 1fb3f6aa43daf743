"""A calibration killed with SIGKILL resumes when re-run and writes the same artifact."""

import subprocess
import sys
import time

from safetensors.torch import load_file

ARGS = ["--bits", "W4A4", "--samples", "32", "--trajectories", "8", "--steps", "5", "--bkd-iters", "100",
        "--method", "dilatequant", "--device", "cpu"]  # fmt: skip


def command(model, out):
    return [sys.executable, "-m", "dilatequant.tools.cli", "calibrate", "--model", str(model), *ARGS, "--out", str(out)]


def tensors(artifact):
    return {**load_file(artifact / "quant_params.safetensors"), **load_file(artifact / "model/diffusion_pytorch_model.safetensors")}


def test_sigkill_then_rerun_resumes_to_the_same_artifact(tiny_model_dirs, tmp_path):
    model = tiny_model_dirs["unet"]
    straight_run = subprocess.run(command(model, tmp_path / "straight"), check=True, capture_output=True, text=True)
    assert "MSE search" in straight_run.stderr

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(model, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work, deadline = tmp_path / "killed.work", time.monotonic() + 120
    while len(list(work.glob("block-*.safetensors"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.kill()  # SIGKILL: no cleanup handlers run
    process.wait()
    done_before_kill = len(list(work.glob("block-*.safetensors")))
    assert 3 <= done_before_kill < 17 and not killed.exists(), "the kill did not land mid-distillation"

    rerun = subprocess.run(command(model, killed), check=True, capture_output=True, text=True)
    assert "wrote" in rerun.stdout and not work.exists()
    # it says what it resumes from, and does not redo the initialisation's MSE search
    assert f"resuming from {work}: calibration data, the activation tables' initialisation, {done_before_kill} distilled" in rerun.stdout
    assert "MSE search" not in rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "straight"]  # no lock, staging or work dir left
    straight, resumed = tensors(tmp_path / "straight"), tensors(killed)
    assert straight.keys() == resumed.keys()
    assert all((straight[k] == resumed[k]).all() for k in straight)
