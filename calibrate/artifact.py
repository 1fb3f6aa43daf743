"""The calibration artifact: the contract between calibrate/ and export/.

    DIR/manifest.json                  kind "calibration", format version, sha256 of every file, summary
    DIR/model/                         the dilated (and distilled) FP model, diffusers format + scheduler/
    DIR/quant_params.safetensors       per layer: weight steps (group-wise: steps and zero points per row and
                                       group); per input group with a table: per-timestep activation steps and
                                       zero points, dilation factors
    DIR/quant_plan.json                every layer: group, bits, boundary, where its dilation went (or why FP)
    DIR/calibration.json               config, timestep grid, source fingerprint, statistics, timings
    DIR/calibration_data.safetensors   the calibration inputs (export re-derives bucket scales from them)
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dilatequant.core.denoiser import LoadedModel, load_model, model_fingerprint, resolve_model_dir
from dilatequant.core.finite import require_finite
from dilatequant.core.manifest import ArtifactError, fields_verified, read_manifest, staged_directory
from dilatequant.core.structure import InputGroup

from .calib_data import CalibrationData
from .config import CalibConfig
from .dilation import DilationRecord
from .groupwise import GroupWeightQuantizer
from .quant_model import LayerPlan, QuantizedDenoiser, wrap_layers
from .timesteps import TimestepIndex

KIND = "calibration"
FORMAT_VERSION = "1.0"
SEPARATOR = "::"


@dataclass
class CalibrationRecord:
    """What calibration.json holds besides the tensors."""

    config: dict
    timesteps: list[int]
    source: dict  # spec, fingerprint, class_name, family
    statistics: dict
    run: dict  # seconds per phase, peak memory, device
    recipe: dict = field(default_factory=dict)  # name, version, method and its parts (absent before recipes)


def quant_tensors(quantized: QuantizedDenoiser) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, wrapper in quantized.quant_layers().items():
        tensors[f"{name}{SEPARATOR}weight_step"] = wrapper.weight_quantizer.step.detach().cpu()
        if isinstance(wrapper.weight_quantizer, GroupWeightQuantizer):
            tensors[f"{name}{SEPARATOR}weight_zero_point"] = wrapper.weight_quantizer.zero_point.cpu()
    for group, quantizer in quantized.act_quantizers().items():
        tensors[f"{group}{SEPARATOR}act_step"] = quantizer.step.detach().cpu()
        tensors[f"{group}{SEPARATOR}act_zero_point"] = quantizer.zero_point.detach().cpu()
        tensors[f"{group}{SEPARATOR}dilation"] = quantizer.dilation.detach().cpu()
    return {k: v.contiguous() for k, v in tensors.items()}


def plan_document(quantized: QuantizedDenoiser, records: dict[str, DilationRecord]) -> dict:
    groups = {}
    for row in quantized.plan:
        entry = groups.setdefault(row.group, {"layers": [], "folded_into": None, "prescale": False})
        entry["layers"].append(row.layer)
        if row.group in records:
            entry["folded_into"] = records[row.group].folded_into
            entry["prescale"] = records[row.group].folded_into is None
    return {"layers": [asdict(row) for row in quantized.plan], "groups": groups}


def write_artifact(out: Path, source: LoadedModel, quantized: QuantizedDenoiser, records: dict[str, DilationRecord],
                   data: CalibrationData, record: CalibrationRecord) -> Path:  # fmt: skip
    """Write the whole artifact atomically (staged, then renamed into place)."""
    plan = plan_document(quantized, records)
    summary = summary_of(CalibConfig.from_dict(record.config), record, plan)
    with staged_directory(out, KIND, FORMAT_VERSION, {"summary": summary}) as staging:
        (staging / "model" / "scheduler").mkdir(parents=True)
        quantized.model.save_config(staging / "model")
        weights = {k: v.detach().cpu().contiguous() for k, v in quantized.fp_state_dict().items()}
        save_file(weights, str(staging / "model" / "diffusion_pytorch_model.safetensors"))
        (staging / "model" / "scheduler" / "scheduler_config.json").write_text(json.dumps(source.scheduler_config, indent=2))
        save_file(quant_tensors(quantized), str(staging / "quant_params.safetensors"))
        (staging / "quant_plan.json").write_text(json.dumps(plan, indent=2) + "\n")
        (staging / "calibration.json").write_text(json.dumps(asdict(record), indent=2) + "\n")
        (staging / "calibration_data.safetensors").write_bytes(data.to_bytes())
    return Path(out)


def summary_of(config: CalibConfig, record: CalibrationRecord, plan: dict) -> dict:
    """The manifest's summary, computed from the records it summarises."""
    return {"bits": config.bits_name, "n_timesteps": len(record.timesteps),
            "n_quantized_layers": sum(bool(row["weight_bits"]) for row in plan["layers"]),
            "source_fingerprint": record.source["fingerprint"]}  # fmt: skip


@dataclass
class CalibrationArtifact:
    """A verified artifact: its manifest and records; the fake-quant model is rebuilt on first use."""

    path: Path
    manifest: dict
    record: CalibrationRecord
    config: CalibConfig
    plan: dict  # quant_plan.json
    tensors: dict[str, torch.Tensor]  # quant_params.safetensors
    device: torch.device

    @functools.cached_property
    def model(self) -> LoadedModel:
        """The fake-quant model on the calibrated timestep grid (its denoiser is a QuantizedDenoiser)."""
        return self.rebuild(TimestepIndex(torch.tensor(self.record.timesteps)), self.device)

    def quantized_layers(self) -> list[dict]:
        """quant_plan.json's rows of the layers with quantized weights (layer, group, weight_bits, act_bits, ...)."""
        return [row for row in self.plan["layers"] if row["weight_bits"]]

    def groups(self) -> list[str]:
        """The input groups with an activation table (one activation quantizer each), sorted."""
        suffix = f"{SEPARATOR}act_step"
        return sorted(k.removesuffix(suffix) for k in self.tensors if k.endswith(suffix))

    def weight_step(self, layer: str) -> torch.Tensor:
        """A layer's per-output-channel weight steps (of the dilated weights)."""
        return self.tensors[f"{layer}{SEPARATOR}weight_step"]

    def weight_zero_point(self, layer: str) -> torch.Tensor | None:
        """A group-wise layer's [out, groups] weight zero points (None for per-channel symmetric layers)."""
        return self.tensors.get(f"{layer}{SEPARATOR}weight_zero_point")

    def dilation(self, group: str) -> torch.Tensor:
        """A group's per-input-channel dilation factors (empty when the group is not dilated)."""
        return self.tensors[f"{group}{SEPARATOR}dilation"]

    def act_steps(self) -> torch.Tensor:
        """(input groups, timesteps) activation steps, read from the tensors without building the model; without
        TPQ the one shared row stands for every timestep."""
        rows = len(self.record.timesteps)
        tables = [self.act_table(group)[0].expand(rows) for group in self.groups()]
        return torch.stack(tables) if tables else torch.empty(0, rows)

    def act_table(self, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One input group's calibrated (steps, zero points), a row per value of `record.timesteps` (one row
        without TPQ)."""
        return self.tensors[f"{group}{SEPARATOR}act_step"], self.tensors[f"{group}{SEPARATOR}act_zero_point"]

    def rebuild(self, index: TimestepIndex, device: torch.device | str = "cpu") -> LoadedModel:
        """The fake-quant model again, with activation tables of `index`'s rows (to be initialised by the caller
        when they differ from the calibrated grid)."""
        loaded = restore_quantized(self.path / "model", self.plan, self.tensors, index, self.config, torch.device(device))
        loaded.denoiser.prompts = self.calibration_data().prompts  # labels of the calibration data index them
        return loaded

    def calibration_data(self) -> CalibrationData:
        """The calibration inputs, read once (export reads them for the bucket scales and the check inputs)."""
        return self._calibration_data

    @functools.cached_property
    def _calibration_data(self) -> CalibrationData:
        return CalibrationData.load(self.path / "calibration_data.safetensors")

    def check_source(self, spec: str | Path) -> None:
        """Refuse a model that is not the one this artifact was calibrated from."""
        fingerprint = model_fingerprint(resolve_model_dir(spec))
        if fingerprint != self.record.source["fingerprint"]:
            raise ArtifactError(f"Model '{spec}' is not the model {self.path} was calibrated from "
                                f"({self.record.source['spec']}, fingerprint {self.record.source['fingerprint'][:12]}…, "
                                f"found {fingerprint[:12]}…). Calibrate this model, or pass the original.")  # fmt: skip


def restore_quantized(model_dir: Path, plan: dict, tensors: dict[str, torch.Tensor], index: TimestepIndex,
                      config: CalibConfig, device: torch.device) -> LoadedModel:  # fmt: skip
    """Rebuild the fake-quant denoiser from the dilated model and the stored quantizer parameters.

    With an `index` of other rows than the stored tables (export's buckets), activation tables are left
    for the caller to initialise.
    """
    loaded = load_model(model_dir, "cpu")
    layer_plan = [LayerPlan(**row) for row in plan["layers"]]
    groups = [InputGroup(name, g["layers"]) for name, g in plan["groups"].items()
              if any(row.weight_bits for row in layer_plan if row.group == name)]  # fmt: skip
    dilations = {g.name: tensors.get(f"{g.name}{SEPARATOR}dilation", torch.ones(0)) for g in groups}  # none: a dynamic input
    records = {name: DilationRecord(name, factors, plan["groups"][name]["folded_into"]) for name, factors in dilations.items() if len(factors)}
    quantized = wrap_layers(loaded.denoiser, groups, layer_plan, records, index, config)
    with torch.no_grad():
        for name, wrapper in quantized.quant_layers().items():
            wrapper.weight_quantizer.step.copy_(tensors[f"{name}{SEPARATOR}weight_step"])
            if isinstance(wrapper.weight_quantizer, GroupWeightQuantizer):
                wrapper.weight_quantizer.zero_point.copy_(tensors[f"{name}{SEPARATOR}weight_zero_point"])
        for group, quantizer in quantized.act_quantizers().items():
            if quantizer.step.shape == tensors[f"{group}{SEPARATOR}act_step"].shape:
                quantizer.step.copy_(tensors[f"{group}{SEPARATOR}act_step"])
                quantizer.zero_point.copy_(tensors[f"{group}{SEPARATOR}act_zero_point"])
    quantized.set_quantization(activations=True, weights=True)
    return LoadedModel(quantized.to(device).eval(), loaded.scheduler_config, model_dir, str(model_dir.parent))


def load_artifact(path: str | Path, device: torch.device | str = "cpu") -> CalibrationArtifact:
    """Verify the manifest (kind, version, every sha256) and read the records; `.model` rebuilds lazily."""
    path = Path(path)
    manifest = read_manifest(path, KIND, FORMAT_VERSION)
    record = CalibrationRecord(**json.loads((path / "calibration.json").read_text()))
    plan = json.loads((path / "quant_plan.json").read_text())
    config = CalibConfig.from_dict(record.config, manifest["format_version"])
    tensors = load_file(str(path / "quant_params.safetensors"))
    require_finite(tensors, f"{path}/quant_params.safetensors", "The calibration diverged or its model had NaN/Inf "
                   "weights: re-calibrate (this dilatequant refuses such models and results).")  # fmt: skip
    return CalibrationArtifact(path, manifest, record, config, plan, tensors, torch.device(device))


def describe(path: str | Path) -> dict:
    """The `inspect` summary of an artifact; verifies every checksum on the way."""
    artifact = load_artifact(path)  # verifies the manifest (its own fields too) and every file
    record, config = artifact.record, artifact.record.config
    return {
        "kind": KIND,
        "path": str(artifact.path),
        "format_version": artifact.manifest["format_version"],
        **summary_of(artifact.config, artifact.record, artifact.plan),  # from the checksummed files, not the manifest
        "checksums_verified": True,
        "manifest_fields_verified": fields_verified(artifact.manifest),
        "files": len(artifact.manifest["files"]),
        "method": config["method"],
        "tpq": config["tpq"],
        "dilation": record.statistics["dilation"] if config["dilation"] else "off",
        "source": record.source,
        "run": record.run,
    }
