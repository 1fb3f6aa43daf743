"""`build(export dir) -> engine dir` and `load(engine dir)`: one engine per timestep bucket.

    ENGINES/manifest.json   kind "engines": backend and version, device, build options, buckets (bucket ->
                            engine file, timestep range), the source export's manifest sha256, sha256 per file
    ENGINES/<files>         whatever the backend writes (optimized ONNX graphs, TensorRT plans, a timing cache)

The manifest's `fidelity` records how far each engine is from its graph (engines/fidelity.py); a build whose
worst layer exceeds the bound is refused (BuildConfig.fidelity 'fail') or written with `passed: false` ('warn').
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dilatequant.core.manifest import MANIFEST_NAME, ArtifactError, fields_verified, read_manifest, sha256_file, staged_directory
from dilatequant.export.contract import BucketTable, read_export_manifest

from .backend import BucketEngine, BuildContext, get_backend
from .config import BuildConfig
from .fidelity import check_engines


class FidelityError(ArtifactError):
    """Built engines compute something else than their graphs; nothing was written."""

KIND = "engines"
FORMAT_VERSION = "2.0"  # 2.0: ONNX Runtime engines share one weights file


def build(export_dir: str | Path, config: BuildConfig, out: str | Path) -> Path:
    """Build engines for every bucket graph of an export directory into `out` (written atomically)."""
    export_dir, out = Path(export_dir), Path(out)
    export_manifest = read_export_manifest(export_dir)
    backend = get_backend(config.backend)
    table = BucketTable.from_dict(export_manifest["buckets"])
    fields = {
        "backend": backend.name, "backend_version": backend.version(), "device": backend.device(config),
        "build": config.to_dict(), "profile": export_manifest["profile"], "precision": export_manifest["precision"],
        "buckets": export_manifest["buckets"], "ranges": [list(r) for r in table.ranges()],
        "model": export_manifest["model"], "calibrated_range": export_manifest["calibrated_range"],
        "source": {"export": str(export_dir), "manifest_sha256": sha256_file(export_dir / MANIFEST_NAME),
                   "source": export_manifest["source"]},
    }  # fmt: skip
    with staged_directory(out, KIND, FORMAT_VERSION, fields) as staging:
        fields.update(backend.build(BuildContext(export_dir, export_manifest, staging, config)))
        if config.fidelity != "off":
            manifest = {**fields, "format_version": FORMAT_VERSION}  # what load() will read, before it is written
            fields["fidelity"] = check_engines(export_dir, export_manifest, staging, manifest, backend, config)
            if config.fidelity == "fail" and not fields["fidelity"]["passed"]:
                raise FidelityError(f"The {backend.name} engines built from {export_dir} do not compute what the graphs say: "
                                    f"{'; '.join(fields['fidelity']['failures'])}. Nothing was written. On ONNX Runtime "
                                    "try --integer-kernels u8u8; --fidelity warn writes the engines anyway.")  # fmt: skip
    return out


class EngineSet:
    """The engines of one engine directory, one per bucket: `run(k, x, t, cond)` runs bucket k's engine.
    `activate()` / `close()` start and release every bucket's engine (`load` returns it active); a context
    manager too: `with load(path) as engines: ...` closes them on exit."""

    def __init__(self, path: Path, manifest: dict, engines: list[BucketEngine]) -> None:
        self.path, self.manifest, self.engines = path, manifest, engines
        self.table = BucketTable.from_dict(manifest["buckets"])

    def __len__(self) -> int:
        return len(self.engines)

    def activate(self) -> EngineSet:
        for engine in self.engines:
            engine.activate()
        return self

    def close(self) -> None:
        for engine in self.engines:
            engine.close()

    def __enter__(self) -> EngineSet:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, bucket: int, x: np.ndarray, t: np.ndarray, cond: np.ndarray | None = None) -> np.ndarray:
        engine = self.engines[bucket]
        feeds = {"x": x, "t": t, **({"cond": cond} if cond is not None else {})}
        missing = set(engine.input_dtypes) - set(feeds)
        if missing:
            raise ArtifactError(f"{self.path} engines take inputs {sorted(engine.input_dtypes)}; {sorted(missing)} not given "
                                "(a conditional model needs cond).")  # fmt: skip
        return engine.infer({name: np.asarray(feeds[name]).astype(dtype, copy=False) for name, dtype in engine.input_dtypes.items()})


def load(path: str | Path) -> EngineSet:
    """Verify an engine directory (checksums, backend and its version) and activate every bucket's engine."""
    path = Path(path)
    manifest = read_manifest(path, KIND, FORMAT_VERSION)
    backend = get_backend(manifest["backend"])
    installed = backend.version()
    if installed != manifest["backend_version"]:
        raise ArtifactError(f"{path} was built with {manifest['backend']} {manifest['backend_version']}, but {installed} is "
                            "installed; engines are specific to the runtime version. Rebuild them with `dilatequant build`.")  # fmt: skip
    return EngineSet(path, manifest, [backend.load(path, manifest, key) for key in manifest["engines"]]).activate()


def describe(path: str | Path) -> dict:
    """The `inspect` summary of an engine directory; verifies every checksum on the way."""
    manifest = read_manifest(Path(path), KIND, FORMAT_VERSION)
    keys = ("backend", "backend_version", "device", "profile", "precision", "ranges", "calibrated_range", "engines", "build")
    return {"kind": KIND, "path": str(path), "format_version": manifest["format_version"], "checksums_verified": True, "manifest_fields_verified": fields_verified(manifest),
            **{key: manifest[key] for key in keys}, "total_bytes": sum(f["bytes"] for f in manifest["files"].values())}  # fmt: skip
