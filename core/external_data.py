"""Where an ONNX tensor's bytes are when they are external data: its proto's location, offset and length entries.
The exporter writes them, and the engines re-point them into their shared weights file; both go through here."""

from __future__ import annotations

from pathlib import Path


def point_to(tensor, location: str, offset: int, length: int) -> None:
    """Make a tensor proto read `length` bytes at `offset` of the file `location` (relative to its graph's directory)
    instead of any data it holds. onnx's `set_external_data` would refuse a tensor whose bytes were never loaded."""
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        tensor.external_data.add(key=key, value=str(value))
    tensor.data_location = TensorProto.EXTERNAL


def external_location(tensor, base_dir: Path) -> tuple[Path, int, int | None]:
    """(file, offset, length or None: to the end of the file) of an external-data tensor proto."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    return base_dir / info["location"], int(info.get("offset", 0)), int(info["length"]) if "length" in info else None
