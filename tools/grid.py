"""Sample grids as PNG: one row per repetition, one column per class, each cell captioned with its class."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dilatequant.core.atomic import atomic_write_bytes

CAPTION_HEIGHT = 12


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, C, H, W) in [-1, 1] -> (n, H, W) or (n, H, W, 3) uint8; other channel counts show channel 0."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy() if pixels.shape[1] == 3 else pixels[:, 0].numpy()


def grid_image(images: torch.Tensor, labels: torch.Tensor, columns: int = 10, scale: int = 2,
               captions: list[str] | None = None) -> Image.Image:  # fmt: skip
    """Tile samples row-major into `columns` columns, upscaled by `scale`, each with a 'class N' caption (or its own)."""
    tiles = [Image.fromarray(p).convert("RGB") for p in to_uint8(images)]
    width, height = tiles[0].width * scale, tiles[0].height * scale
    cell_height = height + CAPTION_HEIGHT
    rows = -(-len(tiles) // columns)
    canvas = Image.new("RGB", (columns * width, rows * cell_height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, label) in enumerate(zip(tiles, labels.tolist())):
        x, y = (i % columns) * width, (i // columns) * cell_height
        canvas.paste(tile.resize((width, height), Image.NEAREST), (x, y + CAPTION_HEIGHT))
        caption = captions[i] if captions else f"class {label}"
        draw.text((x + 2, y), caption[: max(4, width // 6)], fill="black")
    return canvas


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: str | Path, columns: int = 10, captions: list[str] | None = None) -> Path:
    buffer = io.BytesIO()
    grid_image(images, labels, columns, captions=captions).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())
