"""`load_variant`: one model variant to sample, evaluate, compare or rank — whatever stage made it.

A variant is a model (bundled name or diffusers directory: FP), a calibration artifact (its fake-quant model
in torch) or an engine directory (the deployed engines, one per timestep bucket). The CLI's --model / --calib /
--engines / --ref, the demo, the bench and the arena all load variants here. It lives in the roof because it
reaches every stage; each kind is read through its stage's public loader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dilatequant.core.denoiser import LoadedModel, load_model, resolve_model_dir
from dilatequant.core.errors import ModelLoadError, UserError
from dilatequant.core.manifest import MANIFEST_NAME
from dilatequant.core.pipelines import PromptTable, encode_prompts, pipeline_dir_of

KINDS = ("model", "calibration", "engines")


@dataclass
class Variant:
    """A loaded variant: `loaded` samples like any model (denoiser + scheduler config); `artifact` is the
    calibration artifact of a calibration variant. `close()` releases engines (a context manager too)."""

    kind: str
    spec: str
    loaded: LoadedModel
    artifact: Any = None  # calibrate.contract.CalibrationArtifact for kind 'calibration'

    def close(self) -> None:
        if self.kind == "engines":  # the other kinds hold no sessions or pools
            self.loaded.denoiser.close()

    def __enter__(self) -> Variant:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def variant_kind(spec: str | Path) -> str:
    """'engines' or 'calibration' for a directory whose manifest says so; 'model' for anything else (a bundled
    name or a model directory; load_model says what is wrong with a bad one)."""
    manifest = Path(spec) / MANIFEST_NAME
    kind = json.loads(manifest.read_text()).get("kind") if manifest.is_file() else None
    return kind if kind in ("engines", "calibration") else "model"


def load_variant(spec: str | Path, device: torch.device | str = "cpu", kind: str | None = None, clamp: bool = False,
                 source: str | None = None, assume_schedule: bool = False) -> Variant:  # fmt: skip
    """Load `spec` as a variant of `kind` (model | calibration | engines; default: what its manifest says). A given
    kind is loaded as such (the CLI's --model, --calib, --engines), so a wrong directory gets that stage's error; `clamp`: engines run timesteps outside the calibrated range with the nearest
    bucket; `source`: the model a calibration must have been made from (checked by fingerprint); `assume_schedule`: a
    model without a scheduler config samples on the default DDPM schedule."""
    found = kind or variant_kind(spec)
    if found not in KINDS:
        raise UserError(f"Unknown variant kind '{kind}'; kinds: {', '.join(KINDS)}.")
    if found == "engines":
        from dilatequant.engines.runtime import load_engine_model

        return Variant(found, str(spec), load_engine_model(spec, clamp))
    if found == "calibration":
        from dilatequant.calibrate.contract import load_artifact

        artifact = load_artifact(spec, device)
        if source is not None:
            artifact.check_source(source)
        return Variant(found, str(spec), artifact.model, artifact)
    return Variant(found, str(spec), load_model(spec, device, assume_schedule))


def source_spec(variant: Variant) -> str | None:
    """The model a calibration or engine variant was made from, as recorded (engines: in their export's manifest)."""
    if variant.kind == "calibration":
        return variant.artifact.record.source["spec"]
    if variant.kind == "engines":
        return json.loads((Path(variant.spec) / MANIFEST_NAME).read_text())["source"]["source"].get("model")
    return variant.spec


def pipeline_of(variant: Variant) -> Path | None:
    """The text-to-image pipeline directory a variant was made from (whose text encoders encode prompts), if found."""
    if variant.kind == "model":
        return pipeline_dir_of(variant.loaded.model_dir)
    spec = source_spec(variant)
    try:
        return pipeline_dir_of(resolve_model_dir(spec)) if spec else None
    except ModelLoadError:  # moved or deleted since
        return None


def prompt_table(variant: Variant, prompts: list[str], negative_prompt: str, pipeline: Path | None = None) -> PromptTable:
    """`prompts` encoded for `variant`: the ones it was calibrated on as stored, else by the text encoder(s) of
    `pipeline` (default: the pipeline it was made from)."""
    stored = variant.loaded.denoiser.prompts
    if pipeline is None and stored is not None and stored.same_prompts(prompts, negative_prompt):
        return stored
    pipeline = pipeline or pipeline_of(variant)
    if pipeline is None:
        raise UserError(f"--prompts needs the text encoder of the pipeline {variant.spec} was made from, and none was found "
                        "(a bare denoiser, or the pipeline moved). Pass --pipeline DIR: the diffusers pipeline directory.")  # fmt: skip
    return encode_prompts(pipeline, prompts, negative_prompt)
