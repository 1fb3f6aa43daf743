"""`dilatequant inspect`: say what a directory holds, and fail loudly on anything malformed."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from dilatequant.core.denoiser import find_scheduler_config, read_model_config, resolve_model_dir, scheduler_config_file, weight_files
from dilatequant.core.errors import ModelLoadError
from dilatequant.core.families import family_of_class
from dilatequant.core.finite import nonfinite
from dilatequant.core.manifest import MANIFEST_NAME, ArtifactError


def safetensors_summary(path: Path) -> dict:
    """Tensor count, parameter count and dtypes from a safetensors header (no weights are loaded)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            slices = {name: handle.get_slice(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError for any corruption
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc}); re-download or re-save it.") from exc
    parameters = 0
    for tensor in slices.values():
        count = 1
        for dim in tensor.get_shape():
            count *= dim
        parameters += count
    dtypes = sorted({tensor.get_dtype() for tensor in slices.values()})
    return {"file": path.name, "bytes": path.stat().st_size, "tensors": len(slices), "parameters": parameters, "dtypes": dtypes,
            "non_finite": non_finite_tensors(path)}


def non_finite_tensors(path: Path) -> list[str]:
    """Every tensor of a safetensors file holding NaN or Inf, one at a time (calibrate refuses such a model)."""
    found = []
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():
            found += [str(bad) for bad in nonfinite({name: handle.get_tensor(name)})]
    return found


def scheduler_summary(model_dir: Path) -> dict | str:
    if scheduler_config_file(model_dir) is None:
        return "missing: sample, eval, calibrate and export refuse this model until scheduler_config.json is beside config.json"
    scheduler = find_scheduler_config(model_dir)
    return {k: scheduler.get(k) for k in ("_class_name", "num_train_timesteps", "beta_schedule", "prediction_type")}


def inspect_model(spec: str | Path) -> dict:
    """A summary of a model directory (or zoo name); raises ModelLoadError on anything malformed."""
    model_dir = resolve_model_dir(spec)
    config = read_model_config(model_dir)
    weights = [path for path in weight_files(model_dir) if path.suffix == ".safetensors"]
    if not weights:
        found = ", ".join(sorted(p.name for p in model_dir.iterdir()))
        raise ModelLoadError(f"No diffusion_pytorch_model*.safetensors weights in {model_dir} (found: {found}). Save the "
                             "model with save_pretrained(..., safe_serialization=True).")  # fmt: skip
    files = [safetensors_summary(path) for path in weights]
    others = sorted(p.name for p in model_dir.glob("*.safetensors") if p not in weights)
    summary = {
        "kind": "model",
        "path": str(model_dir),
        "class_name": config["_class_name"],
        "family": family_of_class(config["_class_name"]).name,
        "sample_size": config.get("sample_size"),
        "in_channels": config.get("in_channels"),
        "parameters": sum(f["parameters"] for f in files),
        "weights": files,
        "scheduler": scheduler_summary(model_dir),
    }
    if others:
        summary["not_weights"] = others  # in the folder, but not the denoiser's files: not counted, not loaded
    training = model_dir / "training.json"
    if training.is_file():
        record = json.loads(training.read_text())
        summary["training"] = {k: record.get(k) for k in ("steps_taken", "batch", "seed", "device", "seconds")}
    return summary


def inspect_path(spec: str | Path) -> dict:
    """A summary of a model directory, a zoo name or a dilatequant artifact directory."""
    manifest = Path(spec) / MANIFEST_NAME
    if not manifest.is_file():
        return inspect_model(spec)
    try:
        kind = json.loads(manifest.read_text()).get("kind")
    except ValueError as exc:
        raise ArtifactError(f"{manifest} is not valid JSON ({exc}); re-create the directory.") from exc
    if kind == "calibration":
        from dilatequant.calibrate.artifact import describe

        return describe(spec)
    if kind == "export":
        from dilatequant.export.flow import describe as describe_export

        return describe_export(spec)
    if kind == "engines":
        from dilatequant.engines.engine import describe as describe_engines

        return describe_engines(spec)
    raise ArtifactError(f"{manifest} describes a '{kind}' artifact, which this dilatequant cannot inspect.")


def format_summary(summary: dict, indent: str = "") -> str:
    """Indented `key: value` lines for the terminal."""
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(format_summary(value, indent + "  "))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{indent}{key}:")
            for item in value:
                block = format_summary(item, indent + "    ")
                lines.append(indent + "  - " + block.lstrip())
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)
