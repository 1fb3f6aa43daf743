"""Versioned, checksummed manifests for the on-disk artifacts that stages hand to each other.

Every artifact directory (calibration, export, engines) holds `manifest.json`: its kind, a format version,
the tool and library versions, and the sha256 of every file. Directories are staged in a temporary sibling
and renamed into place only when complete, so a crash never leaves a half-written artifact behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .environment import library_versions
from .errors import UserError
from .output import claim_output, default_mode

MANIFEST_NAME = "manifest.json"
SELF_DIGEST = "fields_sha256"  # of the manifest's own fields (content_digest)


class ArtifactError(UserError):
    """An artifact directory is missing, corrupt, of the wrong kind or of an incompatible version."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def file_table(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file under `directory` except the manifest, keyed by relative path."""
    return {
        path.relative_to(directory).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def check_replaceable(out: Path, kind: str) -> None:
    """Refuse to overwrite anything but an empty directory or a dilatequant artifact of the same kind."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is a file; choose another output directory.")
    if not any(out.iterdir()):
        return
    try:
        found = json.loads((out / MANIFEST_NAME).read_text()).get("kind")
    except (OSError, ValueError):
        found = None
    if found != kind:
        raise ArtifactError(f"{out} exists and is not a dilatequant {kind} directory; refusing to overwrite it. "
                            "Choose another output directory, or remove it first.")  # fmt: skip


@contextmanager
def staged_directory(out: Path, kind: str, format_version: str, fields: dict) -> Iterator[Path]:
    """Yield an empty staging directory; on success write the manifest and move it to `out`.

    An existing `out` (an empty directory or an artifact of the same kind) is replaced only after the new
    directory is complete; anything else is refused before any work. The output is claimed meanwhile
    (core/output.py: one writer, stale staging of killed runs removed).
    """
    out = Path(out)
    check_replaceable(out, kind)
    with claim_output(out):
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".staging"))
        try:
            yield staging
            finish(staging, kind, format_version, fields)
            replace_directory(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def finish(staging: Path, kind: str, format_version: str, fields: dict) -> None:
    """Write the manifest of a complete staging directory and give everything the user's usual permissions."""
    manifest = {
        "kind": kind,
        "format_version": format_version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        **fields,
        "files": file_table(staging),
    }
    manifest[SELF_DIGEST] = content_digest(manifest)
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    folder_mode, file_mode = default_mode(True), default_mode(False)
    for path in [staging, *staging.rglob("*")]:
        path.chmod(folder_mode if path.is_dir() else file_mode)


def replace_directory(new: Path, out: Path) -> None:
    """Move `new` to `out`; an old `out` is moved aside first and deleted only after the move succeeded."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        out.rename(old / out.name)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: Path, kind: str, format_version: str, verify: bool = True) -> dict:
    """Load and check a manifest: kind, format major version and (by default) every file's sha256."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST_NAME}: it is not a dilatequant {kind} directory "
                            "(or was not completely written). Re-create it.")  # fmt: skip
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-create the {kind} directory.") from exc
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{directory} holds a '{manifest.get('kind')}' artifact; a '{kind}' directory is expected here.")
    check_format_version(path, manifest.get("format_version", "0.0"), format_version)
    if verify:
        verify_files(directory, manifest)
    return manifest


def content_digest(manifest: dict) -> str:
    """sha256 of the manifest's own fields (all but the digest), so a verified manifest's fields are verified too."""
    fields = {k: v for k, v in manifest.items() if k != SELF_DIGEST}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def fields_verified(manifest: dict) -> bool:
    """Whether read_manifest's verification covered the manifest's own fields (manifests written before SELF_DIGEST
    existed have only their files' checksums): `inspect` says which."""
    return SELF_DIGEST in manifest


def check_format_version(path: Path, found: str, supported: str) -> None:
    if parse_version(found)[0] != parse_version(supported)[0]:
        raise ArtifactError(f"{path} has format version {found}; this dilatequant reads {supported}. "
                            "Re-create the artifact with this version, or use the dilatequant that wrote it.")  # fmt: skip
    if parse_version(found) > parse_version(supported):
        warnings.warn(f"{path} has format version {found}, newer than {supported}; fields added since are ignored.",
                      stacklevel=3)  # fmt: skip


def verify_files(directory: Path, manifest: dict) -> None:
    """The manifest's own fields are as written (manifests written before SELF_DIGEST existed have none to check),
    and every listed file exists with its recorded sha256; names the first thing that is not."""
    if SELF_DIGEST in manifest and manifest[SELF_DIGEST] != content_digest(manifest):
        raise ArtifactError(f"{directory / MANIFEST_NAME} was modified after it was written (its fields no longer match "
                            f"their {SELF_DIGEST}); its summary cannot be trusted. Re-create the artifact.")  # fmt: skip
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in {MANIFEST_NAME} but missing; the artifact is incomplete. Re-create it.")
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{path} does not match its sha256 in {MANIFEST_NAME} (modified or corrupt). Re-create it.")


def recorded_config(cls: type, values: dict, what: str, format_version: str):
    """A config dataclass from its record in a manifest of `format_version`. A key this version does not know is
    an error: the record comes from a newer dilatequant, and ignoring the key would rebuild something else."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ArtifactError(f"Unknown {what} config key(s) {', '.join(unknown)} in a format {format_version} record; this "
                            "dilatequant does not know them (written by a newer version?). Upgrade dilatequant, or "
                            "recreate the artifact with this one.")  # fmt: skip
    return cls(**values)
