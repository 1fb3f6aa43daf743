"""Figures: matplotlib (the `report` extra) without a display, saved atomically as PNG."""

from __future__ import annotations

import io
from pathlib import Path

from .atomic import atomic_write_bytes
from .optional import require


def require_matplotlib():
    """matplotlib.pyplot on the headless Agg backend."""
    require("matplotlib", "Charts", "report").use("Agg")
    return require("matplotlib.pyplot", "Charts", "report")


def save_figure(figure, path: str | Path, dpi: int = 110) -> Path:
    """Write a figure as PNG (atomically) and close it."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi)
    require_matplotlib().close(figure)
    return atomic_write_bytes(path, buffer.getvalue())
