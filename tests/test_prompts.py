"""Text-to-image pipelines (issue 17, part 1): prompts encoded by the pipeline's own text encoders, conditioning packed
into one tensor and unpacked by the family's call, guided sampling equal to the pipeline's, prompted calibration, and
the pipelines generating through the drop-in engines (part 2) on tiny SD, SDXL and PixArt pipelines."""

from __future__ import annotations

import json
import shutil
import warnings

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilatequant.calibrate.calib_data import CalibrationData
from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.contract import load_artifact
from dilatequant.calibrate.flow import calibrate
from dilatequant.core.conditioning import CondLayout
from dilatequant.core.denoiser import load_model
from dilatequant.core.errors import UserError
from dilatequant.core.pipelines import encode_prompts, read_prompts
from dilatequant.core.sampling import SamplerConfig, sample
from dilatequant.engines.config import BuildConfig
from dilatequant.engines.diffusers_adapter import DiffusersDenoiser, as_diffusers
from dilatequant.engines.engine import build
from dilatequant.export.config import ExportConfig
from dilatequant.export.flow import export

PROMPTS = ["a red car", "a cat on a mat", "two birds"]
NEGATIVE = "blurry"
TINY = {"samples": 24, "trajectories": 3, "steps": 4}
DENOISER = {"sd": "unet", "sdxl": "unet", "pixart": "transformer"}
PIPELINES = {"sd": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline, "pixart": diffusers.PixArtAlphaPipeline}


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 6), dim=st.integers(4, 12), mask=st.booleans(), widths=st.lists(st.integers(1, 2), max_size=2),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_pack_then_unpack_gives_back_what_was_packed(tokens, dim, mask, widths, seed):
    layout = CondLayout(mask=mask, extras=tuple((f"e{i}", w) for i, w in enumerate(widths)))
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(2, tokens, dim, generator=generator)
    padding = (torch.rand(2, tokens, generator=generator) > 0.5).float() if mask else None
    extras = {name: torch.randn(2, width, generator=generator) for name, width in layout.extras}
    packed = layout.pack(states, padding, extras)
    assert packed.shape == (2, tokens + bool(widths), dim + mask)
    got_states, got_mask, got_extras = layout.unpack(packed)
    assert torch.equal(got_states, states) and (got_mask is None) == (not mask)
    if mask:
        assert torch.equal(got_mask, padding)
    assert got_extras.keys() == extras.keys() and all(torch.equal(got_extras[k], extras[k]) for k in extras)


def test_added_conditioning_wider_than_the_states_or_missing_is_refused():
    layout = CondLayout(extras=(("text_embeds", 5),))
    with pytest.raises(UserError, match="wider than the encoder states"):
        layout.pack(torch.zeros(1, 2, 4), None, {"text_embeds": torch.zeros(1, 5)})
    with pytest.raises(UserError, match="added_cond_kwargs"):
        layout.pack(torch.zeros(1, 2, 8), None, {})


@pytest.mark.parametrize("kind", ["sd", "sdxl", "pixart"])
def test_the_family_call_on_packed_prompts_is_the_diffusers_model_called_as_its_pipeline_calls_it(kind, tiny_pipelines):
    """The prompt rows are the pipeline's encode_prompt output, and unpacked inside the call they give the model's
    own output for the pipeline's keyword arguments (SDXL's added conditioning, PixArt's mask)."""
    pipe = PIPELINES[kind].from_pretrained(tiny_pipelines[kind], local_files_only=True)
    table = encode_prompts(tiny_pipelines[kind], PROMPTS, NEGATIVE)
    denoiser = load_model(tiny_pipelines[kind]).denoiser
    denoiser.prompts = table
    x, t = torch.randn(4, *denoiser.sample_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 300, 700, 990])
    labels = torch.tensor([0, 1, 2, table.negative_label])
    with torch.no_grad():
        got = denoiser(x, t, denoiser.conditioning(labels))
        model = getattr(pipe, DENOISER[kind])
        if kind == "sd":
            states, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, [NEGATIVE] * 3)
            want = model(x, t, encoder_hidden_states=torch.cat([states, negative[:1]])).sample
        elif kind == "sdxl":
            states, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                                                           negative_prompt=[NEGATIVE] * 3)  # fmt: skip
            time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]]).expand(4, -1)  # 16 latents x 2 (the tiny VAE's scale)
            want = model(x, t, encoder_hidden_states=torch.cat([states, negative[:1]]),
                         added_cond_kwargs={"text_embeds": torch.cat([pooled, negative_pooled[:1]]), "time_ids": time_ids}).sample  # fmt: skip
        else:
            states, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS, negative_prompt=NEGATIVE, device="cpu")
            want = model(x, encoder_hidden_states=torch.cat([states, negative[:1]]), encoder_attention_mask=torch.cat([mask, negative_mask[:1]]),
                         timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]  # fmt: skip
            assert not mask.all(), "T5 pads these prompts: the mask matters"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_guided_sampling_is_the_pipelines_own(tiny_pipelines):
    """Same noise, same scheduler, guidance 7.5 against the negative prompt: dilatequant's sampler gives the
    StableDiffusionPipeline's latents."""
    root = tiny_pipelines["sd"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    loaded = load_model(root)
    loaded.denoiser.prompts = encode_prompts(root, PROMPTS, NEGATIVE)
    want = pipe(PROMPTS, negative_prompt=[NEGATIVE] * 3, num_inference_steps=4, guidance_scale=7.5, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    got = sample(loaded.denoiser, loaded.scheduler_config, torch.arange(3), SamplerConfig(steps=4), progress=False, latents=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    unguided = sample(loaded.denoiser, loaded.scheduler_config, torch.arange(3), SamplerConfig(steps=4, guidance_scale=1), progress=False, latents=True)
    assert not torch.allclose(unguided, got, atol=1e-3)


@pytest.fixture(scope="module")
def prompted(tiny_pipelines, tmp_path_factory):
    """kind -> (calibration artifact, its engines): W8A8 min/max on PROMPTS with guidance, ort-cpu, 2 buckets."""
    root, out = tmp_path_factory.mktemp("prompted"), {}
    for kind in ("sd", "sdxl", "pixart"):
        config = CalibConfig.from_bits("W8A8", method="minmax", prompts=tuple(PROMPTS), negative_prompt=NEGATIVE, **TINY)
        calib = calibrate(tiny_pipelines[kind], config, root / f"{kind}-calib", progress=False)
        engines = build(export(calib, ExportConfig(buckets=2, profile="ort-cpu"), root / f"{kind}-export", progress=False),
                        BuildConfig(threads=1), root / f"{kind}-engines")  # fmt: skip
        out[kind] = (calib, engines)
    return out


def test_prompted_calibration_records_both_guided_halves_and_keeps_the_prompts(prompted, tiny_pipelines):
    calib, _ = prompted["sd"]
    artifact = load_artifact(calib)
    data = artifact.calibration_data()
    table = data.prompts
    assert table.prompts == PROMPTS and table.negative_prompt == NEGATIVE and table.pipeline == str(tiny_pipelines["sd"])
    assert set(data.labels.tolist()) == {0, 1, 2, 3}  # the prompts' halves and the negative prompt's (label 3)
    torch.testing.assert_close(table.rows, encode_prompts(tiny_pipelines["sd"], PROMPTS, NEGATIVE).rows)
    assert artifact.model.denoiser.prompts.same_prompts(PROMPTS, NEGATIVE)  # the fake-quant model conditions on them
    assert artifact.config.prompts == tuple(PROMPTS) and artifact.config.guidance_scale == 7.5
    assert CalibrationData.load(calib / "calibration_data.safetensors").prompts.prompts == PROMPTS


@pytest.mark.parametrize("kind", ["sd", "sdxl", "pixart"])
def test_the_pipeline_generates_through_the_drop_in_engines_like_through_the_fake_quant_model(kind, prompted, tiny_pipelines):
    """pipe.unet / pipe.transformer = as_diffusers(engines): the pipeline's images match the fake-quant pipeline's within
    the engines' tolerance, and the adapter around the FP model reproduces the pipeline exactly."""
    calib, engines = prompted[kind]
    images = {}
    for name, denoiser in (("torch", None), ("fp", DiffusersDenoiser(load_model(tiny_pipelines[kind]).denoiser)),
                           ("fake-quant", DiffusersDenoiser(load_artifact(calib).model.denoiser)), ("engines", as_diffusers(engines))):  # fmt: skip
        pipe = PIPELINES[kind].from_pretrained(tiny_pipelines[kind], local_files_only=True)
        if denoiser is not None:
            setattr(pipe, DENOISER[kind], denoiser)
        pipe.set_progress_bar_config(disable=True)
        extra = {"negative_prompt": NEGATIVE, "use_resolution_binning": False} if kind == "pixart" else {"negative_prompt": [NEGATIVE] * 2}
        images[name] = pipe(PROMPTS[:2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np", **extra).images
    assert images["engines"].shape[0] == 2 and images["engines"].shape[-1] == 3
    np.testing.assert_allclose(images["fp"], images["torch"], atol=1e-5)
    psnr = 10 * np.log10(1 / max(np.mean((images["engines"] - images["fake-quant"]) ** 2), 1e-12))
    assert psnr > 30, psnr


def test_cli_calibrates_samples_and_evaluates_with_prompts(tiny_pipelines, prompted, tmp_path):
    from click.testing import CliRunner

    from dilatequant.tools.cli import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    run = lambda *args: CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)  # noqa: E731
    result = run("calibrate", "--model", tiny_pipelines["sd"], "--prompts", prompts, "--guidance-scale", 5, "--method", "minmax",
                 "--samples", 8, "--trajectories", 2, "--steps", 3, "--device", "cpu", "--out", tmp_path / "calib")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "calib" / "calibration.json").read_text())["config"]["guidance_scale"] == 5
    result = run("sample", "--calib", tmp_path / "calib", "--prompts", prompts, "--n", 3, "--steps", 3, "--device", "cpu", "--out", tmp_path / "s.png")
    assert result.exit_code == 0 and (tmp_path / "s.png").stat().st_size > 0, result.output
    _, engines = prompted["sd"]  # found its pipeline through export and calibration
    result = run("eval", "--engines", engines, "--prompts", prompts, "--n", 3, "--steps", 4, "--ref", tiny_pipelines["sd"], "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["prompts"] == PROMPTS and report["psnr_vs_ref"] > 10 and "metrics_skipped" in report
    with pytest.warns(UserWarning, match="without --prompts it runs on seeded stand-in encoder states"):  # engines keep no prompts
        result = run("sample", "--engines", engines, "--n", 1, "--steps", 4, "--device", "cpu", "--out", tmp_path / "standin.png")
    assert result.exit_code == 0, result.output


def test_bad_prompt_inputs_get_one_line_errors(tiny_pipelines, tiny_model_dirs, tmp_path):
    from click.testing import CliRunner

    from dilatequant.tools.cli import cli

    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(UserError, match="holds no prompt"):
        read_prompts(empty)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    bare = shutil.copytree(tiny_model_dirs["unet-cond"] / "unet", tmp_path / "bare")  # a denoiser folder, no pipeline around it
    shutil.copy(tiny_model_dirs["unet-cond"] / "scheduler" / "scheduler_config.json", bare)
    cases = [
        (["calibrate", "--model", bare, "--prompts", prompts], "needs a text-to-image pipeline"),
        (["calibrate", "--model", tiny_model_dirs["unet-cond"], "--prompts", prompts], "--prompts supports StableDiffusionPipeline"),
        (["calibrate", "--model", tiny_pipelines["sd"], "--negative-prompt", "x"], "add --prompts FILE"),
        (["sample", "--model", tiny_pipelines["sd"], "--negative-prompt", "x", "--n", 1], "add --prompts FILE"),
        (["sample", "--model", tiny_pipelines["sd"], "--prompts", prompts, "--guidance-scale", 0.5, "--n", 1], "guidance_scale must be >= 1"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, [*map(str, args), "--out", str(tmp_path / "o.png" if args[0] == "sample" else tmp_path / "o")])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, (args, result.output)


def test_only_a_text_to_image_pipelines_denoiser_warns_that_it_runs_without_text(tiny_pipelines, tiny_model_dirs, tmp_path):
    from click.testing import CliRunner

    from dilatequant.tools.cli import cli

    for model, warns in ((tiny_pipelines["sd"], True), (tiny_model_dirs["unet-cond"], False)):  # the latter: a pipeline without text encoder
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(cli, ["sample", "--model", str(model), "--n", "1", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "s.png")])
        assert result.exit_code == 0, result.output
        assert any("stand-in encoder states" in str(w.message) for w in caught) == warns, model
