"""The bad-input catalogue: every case a user or a fault tester tried on the CLI, each asserting a non-zero exit, one
'Error:' line that names the problem (and, where there is one, the fix), no traceback and nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.core.output import claim_output
from dilatequant.engines.config import BuildConfig
from dilatequant.engines.engine import build
from dilatequant.export.config import ExportConfig
from dilatequant.export.flow import export
from dilatequant.tools.cli import cli

TINY = {"samples": 16, "trajectories": 8, "steps": 4}
UNWRITABLE = "/proc/dilatequant-cannot-write-here/out"  # refused even to root, unlike a chmod


@pytest.fixture(scope="module")
def made(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """The tiny UNet and its W8A8 calibration, export and ONNX Runtime engines; a W4A4 calibration; a model with NaN
    weights; a calibration whose manifest was edited by hand; a plain file; a text file named .onnx."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model = tiny_model_dirs["unet"]
    paths = {"model": model, "calib": calibrate(model, CalibConfig.from_bits("W8A8", method="minmax", **TINY), root / "calib",
                                                 progress=False)}  # fmt: skip
    paths["export"] = export(paths["calib"], ExportConfig(buckets=2, profile="ort-cpu"), root / "export", progress=False)
    paths["engines"] = build(paths["export"], BuildConfig(fidelity="off"), root / "engines")
    paths["w4a4"] = calibrate(model, CalibConfig.from_bits("W4A4", method="minmax", **TINY), root / "w4a4", progress=False)
    paths["nan-model"] = shutil.copytree(model, root / "nan-model")
    weights = paths["nan-model"] / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = sorted(state)[3]
    state[name] = state[name].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    save_file(state, weights)
    paths["nan-name"] = Path(name)
    edited = shutil.copytree(paths["calib"], root / "edited")
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["summary"].update(bits="W4A4", source_fingerprint="0" * 64)
    (edited / "manifest.json").write_text(json.dumps(manifest))
    paths["edited"] = edited
    paths["tampered"] = shutil.copytree(paths["calib"], root / "tampered")
    (paths["tampered"] / "quant_plan.json").write_text("{}")
    (root / "file.txt").write_text("not a directory")
    paths["file"] = root / "file.txt"
    (root / "not.onnx").write_text("this is not a protobuf")
    paths["not-onnx"] = root / "not.onnx"
    (root / "junk").mkdir()
    (root / "junk" / "notes.txt").write_text("a user's folder")
    paths["junk"] = root / "junk"
    (root / "bad-json").mkdir()
    (root / "bad-json" / "manifest.json").write_text("{not json")
    paths["bad-json"] = root / "bad-json"
    return paths


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]  # {model}, {calib}, {export}, {engines}, {w4a4}, {nan-model}, {edited}, {file}, ..., {out} filled in
    message: str  # a substring of the error line, lower case


CASES = [
    # sample
    Case("sample --n 0", ["sample", "--n", "0", "--out", "{out}.png"], "--n"),
    Case("sample --n -3", ["sample", "--n", "-3", "--out", "{out}.png"], "--n"),
    Case("sample: unknown model", ["sample", "--model", "{out}-missing", "--out", "{out}.png"], "neither a bundled model"),
    Case("sample: unwritable --out", ["sample", "--model", "{model}", "--n", "2", "--steps", "2", "--out", UNWRITABLE + ".png"], "cannot write"),
    Case("sample --steps 0", ["sample", "--model", "{model}", "--steps", "0", "--out", "{out}.png"], "steps"),
    Case("sample --batch-size 0", ["sample", "--model", "{model}", "--batch-size", "0", "--out", "{out}.png"], "--batch-size"),
    Case("sample --device bogus", ["sample", "--model", "{model}", "--device", "bogus", "--out", "{out}.png"], "bogus"),
    Case("sample --scheduler bogus", ["sample", "--scheduler", "bogus", "--out", "{out}.png"], "bogus"),
    Case("sample --calib not an artifact", ["sample", "--calib", "{junk}", "--out", "{out}.png"], "manifest"),
    Case("sample --engines not engines", ["sample", "--engines", "{calib}", "--out", "{out}.png"], "engines"),
    Case("sample --engines with --model", ["sample", "--engines", "{engines}", "--model", "{model}", "--out", "{out}.png"], "drop --model"),
    Case("sample --out is a directory", ["sample", "--model", "{model}", "--out", "{junk}"], "directory"),
    Case("sample: NaN model", ["sample", "--model", "{nan-model}", "--n", "2", "--steps", "2", "--out", "{out}.png"], "non-finite"),
    # eval
    Case("eval --n 0", ["eval", "--n", "0"], "--n"),
    Case("eval: unwritable --out before sampling", ["eval", "--model", "{model}", "--n", "2", "--steps", "2", "--out", UNWRITABLE + ".json"], "cannot write"),
    Case("eval --ref missing", ["eval", "--model", "{model}", "--n", "2", "--steps", "2", "--ref", "{out}-missing"], "neither a bundled model"),
    Case("eval --calib of another model", ["eval", "--calib", "{calib}", "--model", "digits", "--n", "2"], "not the model"),
    Case("eval --calib edited by hand", ["eval", "--calib", "{edited}", "--n", "2"], "modified after it was written"),
    # calibrate
    Case("calibrate --bits bogus", ["calibrate", "--model", "{model}", "--bits", "W3A1x", "--out", "{out}"], "bits"),
    Case("calibrate --method bogus", ["calibrate", "--model", "{model}", "--method", "bogus", "--out", "{out}"], "bogus"),
    Case("calibrate --recipe bogus", ["calibrate", "--model", "{model}", "--recipe", "bogus", "--out", "{out}"], "bogus"),
    Case("calibrate: unwritable --out", ["calibrate", "--model", "{model}", "--out", UNWRITABLE], "cannot write"),
    Case("calibrate --out is a file", ["calibrate", "--model", "{model}", "--out", "{file}"], "file"),
    Case("calibrate --out is a user's folder", ["calibrate", "--model", "{model}", "--out", "{junk}"], "refusing to overwrite"),
    Case("calibrate: NaN model", ["calibrate", "--model", "{nan-model}", "--samples", "8", "--steps", "2", "--out", "{out}"], "non-finite"),
    Case("calibrate: unknown model", ["calibrate", "--model", "{out}-missing", "--out", "{out}"], "neither a bundled model"),
    Case("calibrate: model folder without config", ["calibrate", "--model", "{junk}", "--out", "{out}"], "config"),
    Case("calibrate --samples 0", ["calibrate", "--model", "{model}", "--samples", "0", "--out", "{out}"], "samples"),
    Case("calibrate --steps 0", ["calibrate", "--model", "{model}", "--steps", "0", "--out", "{out}"], "steps"),
    Case("calibrate --bkd-iters -1", ["calibrate", "--model", "{model}", "--bkd-iters", "-1", "--out", "{out}"], "bkd"),
    Case("calibrate minmax with --bkd-iters", ["calibrate", "--model", "{model}", "--method", "minmax", "--bkd-iters", "5", "--out", "{out}"], "bkd"),
    Case("calibrate --group-choices x", ["calibrate", "--model", "{model}", "--method", "q-dit", "--group-choices", "x", "--out", "{out}"], "group-choices"),
    Case("calibrate --head-tables without attention", ["calibrate", "--model", "{model}", "--head-tables", "--out", "{out}"], "quantize_attention"),
    Case("calibrate --device cuda without a GPU", ["calibrate", "--model", "{model}", "--device", "cuda", "--out", "{out}"], "cuda"),
    # export
    Case("export --calib not an artifact", ["export", "--calib", "{junk}", "--out", "{out}"], "manifest"),
    Case("export --calib tampered", ["export", "--calib", "{tampered}", "--out", "{out}"], "sha256"),
    Case("export --calib manifest edited", ["export", "--calib", "{edited}", "--out", "{out}"], "modified after it was written"),
    Case("export --buckets 0", ["export", "--calib", "{calib}", "--buckets", "0", "--out", "{out}"], "--buckets"),
    Case("export --buckets x", ["export", "--calib", "{calib}", "--buckets", "x", "--out", "{out}"], "--buckets"),
    Case("export --buckets beyond the grid", ["export", "--calib", "{calib}", "--buckets", "1000", "--out", "{out}"], "bucket"),
    Case("export --profile bogus", ["export", "--calib", "{calib}", "--profile", "bogus", "--out", "{out}"], "bogus"),
    Case("export: unwritable --out", ["export", "--calib", "{calib}", "--out", UNWRITABLE], "cannot write"),
    Case("export --out is an artifact of another kind", ["export", "--calib", "{calib}", "--out", "{engines}"], "not a dilatequant export"),
    Case("export W4A4", ["export", "--calib", "{w4a4}", "--out", "{out}"], "4 bits"),
    Case("export --calib and --model", ["export", "--calib", "{calib}", "--model", "{model}", "--out", "{out}"], "exactly one"),
    Case("export neither --calib nor --model", ["export", "--out", "{out}"], "exactly one"),
    Case("export --model --precision int8", ["export", "--model", "{model}", "--precision", "int8", "--out", "{out}"], "int8"),
    Case("export --model NaN model", ["export", "--model", "{nan-model}", "--out", "{out}"], "non-finite"),
    # build
    Case("build --export not an export", ["build", "--export", "{calib}", "--out", "{out}"], "export"),
    Case("build --backend bogus", ["build", "--export", "{export}", "--backend", "bogus", "--out", "{out}"], "bogus"),
    Case("build --backend tensorrt without TensorRT", ["build", "--export", "{export}", "--backend", "tensorrt", "--out", "{out}"], "tensorrt"),
    Case("build --batch 1,x", ["build", "--export", "{export}", "--batch", "1,x", "--out", "{out}"], "--batch"),
    Case("build --batch 0,8,32", ["build", "--export", "{export}", "--batch", "0,8,32", "--out", "{out}"], "--batch"),
    Case("build: unwritable --out", ["build", "--export", "{export}", "--out", UNWRITABLE], "cannot write"),
    Case("build --streams 0", ["build", "--export", "{export}", "--streams", "0", "--out", "{out}"], "streams"),
    Case("build --threads -1", ["build", "--export", "{export}", "--threads", "-1", "--out", "{out}"], "threads"),
    # profile
    Case("profile --batch 1,x", ["profile", "--engines", "{engines}", "--batch", "1,x"], "--batch"),
    Case("profile --batch 0", ["profile", "--engines", "{engines}", "--batch", "0"], "--batch"),
    Case("profile --engines not engines", ["profile", "--engines", "{export}"], "engines"),
    Case("profile --max-ratio bogus", ["profile", "--engines", "{engines}", "--compare", "{engines}", "--max-ratio", "bogus"], "--max-ratio"),
    Case("profile --max-ratio without --compare", ["profile", "--engines", "{engines}", "--max-ratio", "8=1"], "--compare"),
    Case("profile --runs 5", ["profile", "--engines", "{engines}", "--runs", "5"], "runs"),
    Case("profile: unwritable --out", ["profile", "--engines", "{engines}", "--out", UNWRITABLE + ".json"], "cannot write"),
    # lint and inspect
    Case("lint on a file that is not ONNX", ["lint", "{not-onnx}"], "not an onnx model"),
    Case("lint on a missing file", ["lint", "{out}-missing.onnx"], "does not exist"),
    Case("lint --profile bogus", ["lint", "{not-onnx}", "--profile", "bogus"], "bogus"),
    Case("inspect a missing path", ["inspect", "{out}-missing"], "neither a bundled model"),
    Case("inspect a manifest that is not JSON", ["inspect", "{bad-json}"], "not valid json"),
    Case("inspect an artifact whose manifest was edited", ["inspect", "{edited}"], "modified after it was written"),
    Case("inspect a tampered artifact", ["inspect", "{tampered}"], "sha256"),
    # demo
    Case("demo: unwritable --out", ["demo", "--out", UNWRITABLE], "cannot write"),
    Case("demo --n 0", ["demo", "--n", "0", "--out", "{out}"], "--n"),
]


def fill(arg: str, made: dict[str, Path], out: Path) -> str:
    return arg.format_map({**{k: str(v) for k, v in made.items()}, "out": str(out)})


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_the_catalogue_has_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_clear_line(case: Case, made, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    before, made_before = tree(tmp_path), {k: tree(v) for k, v in made.items() if v.is_dir()}
    args = [fill(arg, made, tmp_path / "out") for arg in case.args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0, (args, result.output)
    assert isinstance(result.exception, SystemExit), f"traceback: {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert case.message.lower() in errors[0].lower(), (case.message, errors[0])
    assert tree(tmp_path) == before  # nothing written, no staging folder, no lock left
    assert {k: tree(v) for k, v in made.items() if v.is_dir()} == made_before


def test_a_second_run_on_a_claimed_output_is_refused(made, tmp_path):
    """Another process holds the output (as a running calibrate would); a kill releases it at once."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dilatequant.core.output import claim_output\n"
                               f"with claim_output({str(tmp_path / 'out')!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(cli, ["calibrate", "--model", str(made["model"]), "--out", str(tmp_path / "out")])
        assert result.exit_code == 1 and "being written by another dilatequant run (pid" in result.output, result.output
    finally:
        holder.kill()
        holder.wait()
    with claim_output(tmp_path / "out"):  # SIGKILL left the lock file, not the lock
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_runs_staging_is_removed_by_the_next_run(made, tmp_path):
    stale = tmp_path / ".export.a1b2c3d4.staging"
    (stale / "inner").mkdir(parents=True)
    (stale / "inner" / "bucket_0.onnx").write_bytes(b"\0" * 1000)
    (tmp_path / ".export-other.a1b2c3d4.staging").mkdir()  # another output's: left alone
    result = CliRunner().invoke(cli, ["export", "--calib", str(made["calib"]), "--buckets", "2", "--out", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    assert "removed 1 unfinished folder(s)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export-other.a1b2c3d4.staging", "export"]


def test_outputs_get_the_users_permissions(made, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = export(made["calib"], ExportConfig(buckets=2, profile="ort-cpu"), tmp_path / "export", progress=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


def test_a_work_dir_made_with_other_settings_is_not_resumed(made, tmp_path):
    work = tmp_path / "calib.work"
    work.mkdir()
    (work / "key.json").write_text(json.dumps({"config": {"bits": "W4A8"}, "source": "x"}))
    result = CliRunner().invoke(cli, ["calibrate", "--model", str(made["model"]), "--out", str(tmp_path / "calib")])
    assert result.exit_code == 1 and "other settings" in result.output and "delete it to start afresh" in result.output
    assert (work / "key.json").is_file()  # nothing of it was deleted


def test_inspect_reports_non_finite_weights(made):
    result = CliRunner().invoke(cli, ["inspect", str(made["nan-model"]), "--json"])
    assert result.exit_code == 0
    reported = json.loads(result.output)["weights"][0]["non_finite"]
    assert len(reported) == 1 and str(made["nan-name"]) in reported[0]


def test_a_disk_that_fills_during_export_is_one_clear_line_and_keeps_the_old_output(made, tmp_path, monkeypatch):
    import errno

    import dilatequant.export.flow as flow

    out = export(made["calib"], ExportConfig(buckets=2, profile="ort-cpu"), tmp_path / "export", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(flow, "save_with_shared_weights", full)
    result = CliRunner().invoke(cli, ["export", "--calib", str(made["calib"]), "--buckets", "2", "--out", str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "the disk is full" in result.output and "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging, no lock


@pytest.mark.parametrize("phase", ["ranges", "learned"])
def test_non_finite_calibration_results_stop_the_run_naming_the_tensor(made, tmp_path, monkeypatch, phase):
    """A range observed as NaN (e.g. an activation that overflowed) or a parameter that training drove to NaN."""
    import dilatequant.calibrate.flow as flow
    from dilatequant.core.errors import UserError

    poisoned = []

    def poison(quantized) -> None:
        name, quantizer = next(iter(quantized.act_quantizers().items()))
        with torch.no_grad():
            quantizer.step[0] = float("nan")
        poisoned.append(name)

    if phase == "ranges":
        initialise = flow.initialise_activations

        def initialise_then_poison(quantized, *args, **kwargs):
            ranges = initialise(quantized, *args, **kwargs)
            poison(quantized)
            return ranges

        monkeypatch.setattr(flow, "initialise_activations", initialise_then_poison)
        config = CalibConfig.from_bits("W8A8", method="minmax", **TINY)
    else:
        def distill_to_nan(quantized, *args, **kwargs):
            poison(quantized)
            return {}

        monkeypatch.setattr(flow, "distill", distill_to_nan)
        config = CalibConfig.from_bits("W8A8", method="dilatequant", bkd_iters=1, **TINY)
    with pytest.raises(UserError, match="non-finite values") as raised:
        calibrate(made["model"], config, tmp_path / "calib", progress=False)
    assert f"'{poisoned[0]}::step' (1 NaN" in str(raised.value)
    assert ("observed activation ranges" if phase == "ranges" else "calibrated parameters") in str(raised.value)
    assert not (tmp_path / "calib").exists()


@pytest.mark.parametrize("kind", ["calib", "export", "engines"])
def test_inspect_says_the_manifest_fields_were_verified(made, kind):
    result = CliRunner().invoke(cli, ["inspect", str(made[kind]), "--json"])
    summary = json.loads(result.output)
    assert summary["checksums_verified"] is True and summary["manifest_fields_verified"] is True
    if kind == "calib":
        assert summary["bits"] == "W8A8"  # recomputed from the records, not copied from the manifest
