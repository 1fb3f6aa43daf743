"""Recipes and registries: the API and the CLI calibrate alike, configs say what ran, recorded configs are strict
(the four defects of the architecture issue), and every registry entry is usable."""

import dataclasses
import json

import pytest
from click.testing import CliRunner

from dilatequant.calibrate.config import BIT_PRESETS, CalibConfig
from dilatequant.calibrate.recipes import METHODS, RECIPES, get_recipe, method_parts, recipe
from dilatequant.core.errors import ModelLoadError, UserError
from dilatequant.core.families import FAMILIES, family_of_class
from dilatequant.core.manifest import ArtifactError
from dilatequant.engines.config import BACKENDS, BuildConfig
from dilatequant.export.config import ExportConfig
from dilatequant.export.profiles import PROFILES
from dilatequant.tools.cli import cli


def cli_config(monkeypatch, tmp_path, *args: str) -> CalibConfig:
    """The CalibConfig `dilatequant calibrate ARGS` would run (the run itself replaced by a recorder)."""
    seen = {}
    monkeypatch.setattr("dilatequant.calibrate.flow.calibrate",
                        lambda model, config, out, device, **options: seen.update(config=config, **options) or out)  # fmt: skip
    result = CliRunner().invoke(cli, ["calibrate", *args, "--device", "cpu", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    # only an explicit --scheduler lets a model without a scheduler config calibrate on the default DDPM schedule
    assert seen["assume_schedule"] == ("--scheduler" in args)
    return seen["config"]


def test_api_and_cli_calibrate_with_the_same_defaults(monkeypatch, tmp_path):
    # defect: CalibConfig() distilled 0 iterations while the CLI ran 400
    assert cli_config(monkeypatch, tmp_path) == CalibConfig() == CalibConfig.from_bits("W8A8")
    assert CalibConfig().bkd_iters == 2000 and CalibConfig().act_init == "mse" and CalibConfig().bkd_lr_weight == 1e-4
    old = recipe("dilatequant-v1")
    assert (old.bkd_iters, old.bkd_lr_weight, old.method) == (400, 1e-5, "dilatequant")
    assert cli_config(monkeypatch, tmp_path, "--method", "minmax", "--bits", "W4A8") == CalibConfig.from_bits("W4A8", method="minmax")
    assert cli_config(monkeypatch, tmp_path, "--recipe", "demo-quick", "--samples", "64") == recipe("demo-quick", samples=64)
    assert cli_config(monkeypatch, tmp_path, "--scheduler", "ddim") == CalibConfig()


def test_every_cli_option_default_is_its_configs_default():
    for command, config in (("calibrate", CalibConfig), ("build", BuildConfig), ("export", ExportConfig)):
        fields = {f.name: f.default for f in dataclasses.fields(config)}
        for param in cli.commands[command].params:
            if param.name in fields and param.default is not None and not param.is_flag:
                assert param.default == fields[param.name] or str(param.default) == str(fields[param.name]), (command, param.name)


def test_eda_dm_is_its_parts_and_the_released_settings():
    config = CalibConfig(method="eda-dm")
    assert (config.tpq, config.dilation, config.timestep_sampling, config.recon_loss, config.input_mixing,
            config.weight_rounding, config.bkd_iters, config.trajectories) == (False, False, "tdac", "fbr", "qdrop",
                                                                              "learned-rounding", 5000, 1024)  # fmt: skip
    # recipes compose: DilateQuant with TDAC and FBR/QDrop is a config, not new code
    mixed = CalibConfig(timestep_sampling="tdac", trajectories=1024, recon_loss="fbr", input_mixing="qdrop")
    assert mixed.dilation and mixed.tpq and mixed.weight_rounding == "trained-weights"
    with pytest.raises(UserError, match="recon_loss='fbr' would not run: there is no reconstruction"):
        CalibConfig(method="minmax", recon_loss="fbr")


def test_q_dit_keeps_the_boundary_layers_in_fp_as_released_and_the_others_keep_them_at_8_bits():
    """Q-DiT's code leaves the patch embedder, the timestep/label embedders and the final layer in FP; the
    setting is the method's, so a user can still ask for 8 bits."""
    assert [CalibConfig(method=m).boundary for m in ("dilatequant", "minmax", "eda-dm", "q-dit")] == ["8bit"] * 3 + ["fp"]
    assert recipe("q-dit-search").boundary == recipe("q-dit-tensorrt").boundary == "fp"
    assert CalibConfig(method="q-dit", boundary="8bit").boundary == "8bit"


def test_minmax_records_the_initialisation_that_ran():
    # defect: method='minmax' overrode act_init silently while the artifact recorded act_init='mse'
    config = CalibConfig(method="minmax")
    assert (config.act_init, config.bkd_iters, config.recipe) == ("minmax", 0, "minmax")
    with pytest.raises(UserError, match="act_init='mse' would not run"):
        CalibConfig(method="minmax", act_init="mse")
    with pytest.raises(UserError, match="bkd_iters=100 would not run"):
        CalibConfig(method="minmax", bkd_iters=100)
    legacy = {**CalibConfig(method="minmax").to_dict(), "act_init": "mse"}
    del legacy["recipe"]  # a format 1.0 record from before recipes
    assert CalibConfig.from_dict(legacy).act_init == "minmax"


def test_export_config_is_not_rewritten_and_records_what_it_wrote():
    # defect: ExportConfig rewrote its frozen fp32 field for ort-cpu, so replace(profile='tensorrt') stayed FP32
    ort = ExportConfig(profile="ort-cpu")
    assert ort.fp32 is False and ort.precision == "fp32" and ort.to_dict()["fp32"] is True
    assert dataclasses.replace(ort, profile="tensorrt").precision == "fp16"
    assert ExportConfig.from_dict(ort.to_dict()).precision == "fp32"


@pytest.mark.parametrize("config, values", [
    (CalibConfig, {**CalibConfig().to_dict(), "bkd_temperature": 2.0}),
    (BuildConfig, {**BuildConfig().to_dict(), "tiling": True}),
    (ExportConfig, {**ExportConfig().to_dict(), "sparsity": 0.5}),
])  # fmt: skip
def test_unknown_recorded_config_keys_are_an_error(config, values):
    # defect: CalibConfig.from_dict silently dropped unknown keys
    unknown = (set(values) - {f.name for f in dataclasses.fields(config)}).pop()
    with pytest.raises(ArtifactError, match=rf"Unknown \w+ config key\(s\) {unknown} in a format 1.3 record.*Upgrade"):
        config.from_dict(values, "1.3")


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_is_a_valid_config_at_every_bit_preset(name):
    for bits in BIT_PRESETS:
        config = recipe(name, bits)
        assert config.recipe == name and config.method == get_recipe(name).method and config.bits_name == bits
        assert all(getattr(config, key) == value for key, value in get_recipe(name).settings.items())
    assert get_recipe(get_recipe(name).method).parts is not None


def test_recipes_keep_the_settings_the_tools_ran():
    assert recipe("demo-quick") == CalibConfig.from_bits("W8A8", method="minmax", samples=512, trajectories=32, steps=25,
                                                         boundary="fp", recipe="demo-quick")  # fmt: skip
    assert (recipe("naive-minmax").tpq, recipe("naive-minmax").dilation) == (False, False)
    assert set(METHODS) == {"dilatequant", "minmax", "eda-dm", "repquant", "q-dit"}
    with pytest.raises(UserError, match="Unknown calibration recipe 'fast'; recipes: dilatequant, minmax"):
        recipe("fast")
    with pytest.raises(UserError, match="method=.demo-quick. is not one of: dilatequant, minmax, eda-dm, repquant, q-dit"):
        CalibConfig(method="demo-quick")
    with pytest.raises(UserError, match="'demo-quick' is a settings recipe, not a method"):
        method_parts("demo-quick")


def test_cli_choices_come_from_the_registries():
    params = {(c, p.name): p for c in cli.commands for p in cli.commands[c].params}
    assert list(params["export", "profile"].type.choices) == list(PROFILES)
    assert list(params["lint", "profile"].type.choices) == list(PROFILES)
    assert list(params["build", "backend"].type.choices) == list(BACKENDS)
    assert list(params["calibrate", "method"].type.choices) == list(METHODS)
    assert list(params["calibrate", "recipe_name"].type.choices) == list(RECIPES)


def test_family_registry_covers_every_supported_class(tiny_model_dirs):
    from dilatequant.core.denoiser import load_model, read_model_config, resolve_model_dir

    for name, directory in tiny_model_dirs.items():
        class_name = read_model_config(resolve_model_dir(directory))["_class_name"]
        assert family_of_class(class_name).name == name == load_model(directory).denoiser.family
    assert set(FAMILIES) == {"unet", "unet-cond", "dit", "pixart"}
    with pytest.raises(ModelLoadError, match="describes a 'VQModel'.*Supported denoisers: UNet2DModel"):
        family_of_class("VQModel")


def test_a_calibration_records_its_recipe_and_parts(tiny_model_dirs, tmp_path):
    from dilatequant.calibrate.flow import calibrate

    path = calibrate(tiny_model_dirs["unet"], recipe("naive-minmax", samples=16, trajectories=4, steps=4), tmp_path / "c", progress=False)
    record = json.loads((path / "calibration.json").read_text())
    assert record["recipe"]["name"] == "naive-minmax" and record["recipe"]["version"] == 1
    parts = record["recipe"]["parts"]
    assert (parts["initialisation"], parts["reconstruction"], parts["transforms"], parts["act_format"]) == ("minmax", None, [], "per-tensor")
    assert record["config"]["act_init"] == "minmax" and record["config"]["bkd_iters"] == 0
