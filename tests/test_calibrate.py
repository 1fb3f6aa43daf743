"""calibrate() end to end on the tiny families: artifact contents, integrity checks, fake-quant accuracy."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from dilatequant.calibrate.artifact import load_artifact
from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.core.denoiser import load_model
from dilatequant.core.errors import UserError
from dilatequant.core.manifest import ArtifactError
from dilatequant.tools.cli import cli

TINY = {"samples": 32, "trajectories": 8, "steps": 5}


@pytest.fixture(scope="module")
def artifacts(tiny_model_dirs, tmp_path_factory):
    """(family, bits) -> artifact directory, calibrated once per module."""
    root = tmp_path_factory.mktemp("calib")
    return {(family, bits): calibrate(path, CalibConfig.from_bits(bits, bkd_iters=0, **TINY), root / f"{family}-{bits}", progress=False)
            for family, path in tiny_model_dirs.items() for bits in ("W8A8", "W4A4")}  # fmt: skip


def relative_error(artifact_dir, model_dir) -> float:
    artifact = load_artifact(artifact_dir)
    fp, data = load_model(model_dir).denoiser, artifact.calibration_data()
    cond = fp.conditioning(data.labels)
    with torch.no_grad():
        expected, actual = fp(data.x, data.t, cond), artifact.model.denoiser(data.x, data.t, cond)
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("family", ["unet", "unet-cond", "dit", "pixart"])
def test_rebuilt_fake_quant_model_tracks_fp_and_more_bits_track_better(artifacts, tiny_model_dirs, family):
    w8a8 = relative_error(artifacts[family, "W8A8"], tiny_model_dirs[family])
    w4a4 = relative_error(artifacts[family, "W4A4"], tiny_model_dirs[family])
    assert w8a8 < 0.1 and w8a8 < w4a4


def test_artifact_contents(artifacts):
    path = artifacts["unet", "W8A8"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "calibration" and manifest["format_version"] == "1.0"
    assert manifest["summary"]["bits"] == "W8A8" and manifest["summary"]["n_timesteps"] == 5
    assert {"model/config.json", "model/diffusion_pytorch_model.safetensors", "quant_params.safetensors",
            "quant_plan.json", "calibration.json", "calibration_data.safetensors"} <= manifest["files"].keys()  # fmt: skip
    plan = json.loads((path / "quant_plan.json").read_text())
    assert all(row["weight_bits"] in (8,) for row in plan["layers"])
    assert any(g["folded_into"] for g in plan["groups"].values()) and any(g["prescale"] for g in plan["groups"].values())
    # the dilated model directory is a plain diffusers model
    assert load_model(path / "model").denoiser.family == "unet"


def test_tpq_tables_have_a_row_per_timestep_and_no_tpq_one(artifacts, tiny_model_dirs, tmp_path):
    rows = {len(q.step) for q in load_artifact(artifacts["unet", "W8A8"]).model.denoiser.act_quantizers().values()}
    assert rows == {5}
    shared = calibrate(tiny_model_dirs["unet"], CalibConfig(tpq=False, bkd_iters=0, **TINY), tmp_path / "shared", progress=False)
    assert {len(q.step) for q in load_artifact(shared).model.denoiser.act_quantizers().values()} == {1}


def test_boundary_layers_can_stay_fp(tiny_model_dirs, tmp_path):
    path = calibrate(tiny_model_dirs["unet"], CalibConfig(boundary="fp", bkd_iters=0, **TINY), tmp_path / "a", progress=False)
    plan = {row["layer"]: row for row in json.loads((path / "quant_plan.json").read_text())["layers"]}
    assert plan["conv_in"]["weight_bits"] is None and "kept FP" in plan["conv_in"]["note"]
    assert "conv_in" not in load_artifact(path).model.denoiser.quant_layers()


def copy_of(path, tmp_path):
    return shutil.copytree(path, tmp_path / "copy")


def test_a_modified_file_is_named(artifacts, tmp_path):
    path = copy_of(artifacts["unet", "W8A8"], tmp_path)
    (path / "quant_plan.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"quant_plan.json does not match its sha256"):
        load_artifact(path)


def test_a_missing_file_is_named(artifacts, tmp_path):
    path = copy_of(artifacts["unet", "W8A8"], tmp_path)
    (path / "quant_params.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"quant_params.safetensors is listed .* but missing"):
        load_artifact(path)


def test_an_incompatible_format_version_is_refused(artifacts, tmp_path):
    path = copy_of(artifacts["unet", "W8A8"], tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": "2.0"}))
    with pytest.raises(ArtifactError, match="format version 2.0; this dilatequant reads 1.0"):
        load_artifact(path)


def test_a_directory_without_manifest_is_refused(tiny_model_dirs):
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        load_artifact(tiny_model_dirs["unet"])


def test_another_source_model_is_refused(artifacts, tiny_model_dirs):
    with pytest.raises(ArtifactError, match="is not the model .* was calibrated from"):
        load_artifact(artifacts["unet", "W8A8"]).check_source(tiny_model_dirs["dit"])


def test_rewriting_an_artifact_replaces_it_whole(tiny_model_dirs, tmp_path):
    out = tmp_path / "art"
    calibrate(tiny_model_dirs["unet"], CalibConfig.from_bits("W8A8", bkd_iters=0, **TINY), out, progress=False)
    calibrate(tiny_model_dirs["unet"], CalibConfig.from_bits("W4A8", bkd_iters=0, **TINY), out, progress=False)
    assert load_artifact(out).config.weight_bits == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no staging or old copies left


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"samples": 100, "trajectories": 2, "steps": 5}, "exceeds the 2 trajectories"),
     ({"act_init": "kl"}, "act_init='kl' is not one of"), ({"weight_bits": 3}, "weight_bits=3 is unsupported")],
)  # fmt: skip
def test_bad_configs_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        CalibConfig(**overrides)


def test_bits_preset():
    assert CalibConfig.from_bits("W4A8").bits_name == "W4A8"
    with pytest.raises(UserError, match="not of the form WxAy"):
        CalibConfig.from_bits("int8")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_calibrate_inspect_and_eval(tiny_model_dirs, tmp_path):
    out = tmp_path / "cal"
    result = invoke("calibrate", "--model", tiny_model_dirs["dit"], "--bits", "W4A8", "--samples", 16,
                    "--trajectories", 4, "--steps", 4, "--device", "cpu", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(invoke("inspect", out, "--json").stdout)
    assert summary["bits"] == "W4A8" and summary["n_timesteps"] == 4 and summary["checksums_verified"] is True
    assert summary["n_quantized_layers"] > 10 and 0 < summary["dilation"]["unsaturated_share"] <= 1
    record = json.loads(invoke("eval", "--calib", out, "--n", 4, "--steps", 4, "--device", "cpu").stdout)
    assert record["reference"] == str(tiny_model_dirs["dit"]) and record["psnr_vs_ref"] > 10
    # a calibration artifact as the reference is its fake-quant model: against itself, the same images
    itself = json.loads(invoke("eval", "--calib", out, "--ref", out, "--n", 4, "--steps", 4, "--device", "cpu").stdout)
    assert itself["psnr_vs_ref"] > 100 and itself["reference_metrics"] is not None
    grid = tmp_path / "grid.png"
    assert invoke("sample", "--calib", out, "--n", 4, "--steps", 2, "--device", "cpu", "--out", grid).exit_code == 0
    mismatch = invoke("sample", "--calib", out, "--model", tiny_model_dirs["unet"], "--out", grid)
    assert mismatch.exit_code == 1 and "is not the model" in mismatch.output


def test_block_distillation_lowers_block_errors_and_end_to_end_error(tiny_model_dirs, artifacts, tmp_path):
    config = CalibConfig.from_bits("W4A4", bkd_iters=40, bkd_batch=8, **TINY)
    path = calibrate(tiny_model_dirs["dit"], config, tmp_path / "bkd", progress=False)
    blocks = json.loads((path / "calibration.json").read_text())["statistics"]["blocks"]
    assert list(blocks)[:2] == ["pos_embed", "transformer_blocks.0"]  # call order
    assert all(b["mse_after"] <= b["mse_before"] for b in blocks.values())
    assert sum(b["mse_after"] < b["mse_before"] for b in blocks.values()) >= len(blocks) // 2
    assert relative_error(path, tiny_model_dirs["dit"]) < relative_error(artifacts["dit", "W4A4"], tiny_model_dirs["dit"])


@pytest.mark.slow
def test_digits_w8a8_keeps_recognisable_digits(tmp_path):
    config = CalibConfig.from_bits("W8A8", method="minmax", samples=64, trajectories=8, steps=10)
    path = calibrate("digits", config, tmp_path / "digits", progress=False)
    record = json.loads(invoke("eval", "--calib", path, "--n", 20, "--steps", 10, "--device", "cpu").stdout)
    assert record["class_accuracy"] >= 0.9 and record["psnr_vs_ref"] > 25


def test_sensitivity_tool_reports_paired_psnr_per_subset(artifacts):
    from dilatequant.tools import sensitivity

    result = CliRunner().invoke(sensitivity.main, ["--calib", str(artifacts["unet", "W4A4"]), "--n", "2", "--steps", "2",
                                                   "--device", "cpu"], catch_exceptions=False)  # fmt: skip
    psnr = json.loads(result.output.strip().splitlines()[-1])["psnr_vs_fp"]
    assert {"all quantized", "weights only", "activations only", "all but boundary layers", "all but conv_in"} <= psnr.keys()
    # at W4A4 the 4-bit activations dominate: switching them off must recover several dB (it really toggles quantizers)
    assert psnr["weights only"] > psnr["all quantized"] + 3


def test_sensitivity_tool_switches_dynamic_inputs_off_too(tiny_model_dirs, tmp_path):
    """Q-DiT's dynamic Linear inputs have no table; 'weights only' must still turn them off."""
    from dilatequant.tools import sensitivity

    config = CalibConfig.from_bits("W4A4", method="q-dit", weight_group_size=4, **TINY)
    calib = calibrate(tiny_model_dirs["dit"], config, tmp_path / "q", progress=False)
    result = CliRunner().invoke(sensitivity.main, ["--calib", str(calib), "--n", "2", "--steps", "2", "--device", "cpu"],
                                catch_exceptions=False)  # fmt: skip
    psnr = json.loads(result.output.strip().splitlines()[-1])["psnr_vs_fp"]
    # both halves cost PSNR at W4A4: each subset that switches one off must gain (before the fix, "weights only"
    # left the dynamic inputs on and equalled "all quantized")
    assert min(psnr["weights only"], psnr["activations only"]) > psnr["all quantized"] + 1


def test_an_unrelated_output_directory_is_never_overwritten(tiny_model_dirs, tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match="is not a dilatequant calibration directory; refusing to overwrite"):
        calibrate(tiny_model_dirs["unet"], CalibConfig(bkd_iters=0, **TINY), keep, progress=False)
    assert (keep / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("bkd_iters", [0, 2])
def test_only_distillation_keeps_a_second_copy_of_the_model(tiny_model_dirs, tmp_path, monkeypatch, bkd_iters):
    """Without distillation (or the group-size search) the FP model is not needed after the calibration data: it
    becomes the fake-quant model in place, so calibration holds one copy of the weights, not two."""
    import dilatequant.calibrate.flow as flow

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("in_place", False))
        return prepare(*args, **kwargs)

    prepare = flow.prepare
    monkeypatch.setattr(flow, "prepare", spy)
    config = CalibConfig.from_bits("W8A8", method="dilatequant", bkd_iters=bkd_iters, samples=16, trajectories=4, steps=4)
    calibrate(tiny_model_dirs["unet"], config, tmp_path / "cal", progress=False)
    assert seen == [bkd_iters == 0]
