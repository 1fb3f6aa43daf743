import json

import pytest
from click.testing import CliRunner
from PIL import Image

from dilatequant.tools.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("command", [[], ["sample"], ["eval"], ["inspect"]])
def test_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage: " in result.output


def test_sample_writes_a_labelled_png_grid(tmp_path):
    out = tmp_path / "grid.png"
    result = invoke("sample", "--model", "digits", "--n", 12, "--steps", 2, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (10 * 64, 2 * (64 + 12))


def test_eval_on_digits_writes_the_metrics_json(tmp_path):
    out = tmp_path / "eval.json"
    result = invoke("eval", "--model", "digits", "--n", 20, "--steps", 2, "--device", "cpu", "--ref", "digits", "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert {"fid_digits", "class_accuracy", "psnr_vs_ref", "n", "steps", "seconds", "device"} <= record.keys()
    assert record["n"] == 20 and record["steps"] == 2 and record["psnr_vs_ref"] > 100  # same model, same noise
    assert json.loads(result.stdout) == record


def test_eval_on_a_non_digits_family_skips_digit_metrics(tiny_model_dirs, tmp_path):
    result = invoke("eval", "--model", tiny_model_dirs["dit"], "--n", 4, "--steps", 2, "--device", "cpu")
    record = json.loads(result.stdout)
    assert "fid_digits" not in record and "need 1x32x32 digits" in record["metrics_skipped"]


def test_inspect_json_of_the_bundled_model():
    result = invoke("inspect", "digits", "--json")
    summary = json.loads(result.stdout)
    assert summary["class_name"] == "UNet2DModel" and summary["parameters"] > 1e6
    assert summary["weights"][0]["file"] == "diffusion_pytorch_model.safetensors"


def test_inspect_text_of_each_family(tiny_model_dir):
    result = invoke("inspect", tiny_model_dir)
    assert result.exit_code == 0 and "family:" in result.output and "parameters:" in result.output


def test_inspect_rejects_corrupt_weights(tiny_model_dirs, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_dirs["unet"] / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 16)
    result = invoke("inspect", tmp_path)
    assert result.exit_code == 1 and "not a readable safetensors file" in result.output


def test_inspect_rejects_a_directory_without_weights(tiny_model_dirs, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_dirs["unet"] / "config.json").read_text())
    result = invoke("inspect", tmp_path)
    assert result.exit_code == 1 and "No diffusion_pytorch_model*.safetensors weights" in result.output


def test_user_errors_are_one_line_without_traceback():
    result = invoke("sample", "--model", "stabilityai/sd-turbo", "--out", "x.png")
    assert result.exit_code == 1
    assert result.output.startswith("Error: Model 'stabilityai/sd-turbo'") and "Traceback" not in result.output


def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = invoke("sample", "--device", "cuda", "--out", "x.png")
    assert result.exit_code == 1 and "sees no CUDA GPU. Use --device cpu" in result.output


def test_eval_refuses_a_reference_of_another_shape(tiny_model_dirs):
    result = invoke("eval", "--model", "digits", "--ref", tiny_model_dirs["dit"], "--n", 4, "--steps", 1, "--device", "cpu")
    assert result.exit_code == 1 and "PSNR needs the same shape" in result.output


def test_paired_images_sample_to_files_and_compare_them(tiny_model_dirs, tmp_path):
    from dilatequant.tools.paired_images import compare, sample_variant

    model = str(tiny_model_dirs["unet"])
    sample_variant(model, 2, 2, tmp_path / "a.pt")
    sample_variant(model, 2, 2, tmp_path / "b.pt")  # same seed: the same images
    sample_variant(model, 2, 3, tmp_path / "c.pt")
    same = compare(tmp_path / "a.pt", tmp_path / "b.pt")
    assert same["psnr_db"] > 100 and same["n"] == 2 and same["steps"] == 2
    with pytest.raises(SystemExit, match="different settings"):
        compare(tmp_path / "a.pt", tmp_path / "c.pt")


@pytest.mark.slow
def test_digits_dit_through_every_verb(tmp_path):
    """The bundled DiT: inspect, eval (digit metrics: it draws digits), calibrate with Q-DiT, export to ort-dynamic,
    build and sample through the engines."""
    summary = json.loads(invoke("inspect", "digits-dit", "--json").stdout)
    assert summary["class_name"] == "DiTTransformer2DModel" and 1e7 < summary["parameters"] < 1.2e7
    assert sum(w["bytes"] for w in summary["weights"]) <= 25e6  # fp16, as shipped
    record = json.loads(invoke("eval", "--model", "digits-dit", "--n", 20, "--steps", 4, "--device", "cpu").stdout)
    assert {"fid_digits", "class_accuracy"} <= record.keys()
    steps = [("calibrate", "--model", "digits-dit", "--method", "q-dit", "--bits", "W4A8", "--samples", 8, "--trajectories", 2,
              "--steps", 4, "--device", "cpu", "--out", tmp_path / "calib"),
             ("export", "--calib", tmp_path / "calib", "--profile", "ort-dynamic", "--buckets", 1, "--out", tmp_path / "export"),
             ("build", "--export", tmp_path / "export", "--out", tmp_path / "engines"),
             ("sample", "--engines", tmp_path / "engines", "--n", 4, "--steps", 2, "--out", tmp_path / "g.png")]  # fmt: skip
    for args in steps:
        result = invoke(*args)
        assert result.exit_code == 0, (args[0], result.output)
    assert Image.open(tmp_path / "g.png").format == "PNG"
