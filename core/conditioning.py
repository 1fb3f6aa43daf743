"""One conditioning tensor per sample, whatever a text-conditioned denoiser takes besides (x, t).

Graphs, engines, calibration data and samplers pass `cond` as one float tensor (B, tokens, width). A family whose
model takes more than encoder states packs them into it, as its `CondLayout` says:

- `mask`: the encoder attention mask (PixArt's T5 padding) rides as one extra channel, so width = dim + 1;
- `extras`: added conditioning vectors (SDXL's pooled `text_embeds` and `time_ids`; PixArt-1024's `resolution` and
  `aspect_ratio`) are concatenated into one extra token row after the encoder states (zero-padded to the width).

Everything that is not the family's call or a pipeline adapter sees one tensor, so calibration data, ONNX inputs,
buckets and engines need nothing per family; the family's call unpacks it inside the exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass(frozen=True)
class CondLayout:
    mask: bool = False  # an encoder attention mask in the last channel
    extras: tuple[tuple[str, int], ...] = ()  # (name, width) of the added conditioning vectors, in the extra row

    @property
    def plain(self) -> bool:
        """Encoder states alone: `cond` is the encoder states."""
        return not self.mask and not self.extras

    def pack(self, states: torch.Tensor, mask: torch.Tensor | None = None, extras: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, tokens, dim) encoder states [+ (B, tokens) mask] [+ extras] -> cond."""
        if self.plain:
            return states
        if self.mask:
            keep = torch.ones(states.shape[:2]) if mask is None else mask
            states = torch.cat([states, keep.to(states)[..., None]], dim=-1)
        if self.extras:
            missing = [name for name, _ in self.extras if extras is None or name not in extras]
            if missing:
                raise UserError(f"This denoiser takes added conditioning {', '.join(missing)} (e.g. SDXL's text_embeds and "
                                "time_ids): pass them as the pipeline does, in added_cond_kwargs.")  # fmt: skip
            row = torch.cat([extras[name].reshape(len(states), width).to(states) for name, width in self.extras], dim=-1)
            if row.shape[-1] > states.shape[-1]:
                raise UserError(f"The added conditioning ({row.shape[-1]} values) is wider than the encoder states "
                                f"({states.shape[-1]}); this layout cannot carry it.")  # fmt: skip
            row = torch.nn.functional.pad(row, (0, states.shape[-1] - row.shape[-1]))
            states = torch.cat([states, row[:, None]], dim=1)
        return states

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """cond -> (encoder states, mask or None, extras)."""
        extras, mask = {}, None
        if self.extras:
            row, cond = cond[:, -1], cond[:, :-1]
            start = 0
            for name, width in self.extras:
                extras[name] = row[:, start : start + width]
                start += width
        if self.mask:
            cond, mask = cond[..., :-1], cond[..., -1]
        return cond, mask, extras


def size_extras(height: int, width: int) -> dict[str, torch.Tensor]:
    """The size conditioning of an image of height x width pixels, uncropped (as pipelines compute it by default)."""
    return {"time_ids": torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32),
            "resolution": torch.tensor([height, width], dtype=torch.float32),
            "aspect_ratio": torch.tensor([height / width], dtype=torch.float32)}  # fmt: skip


def standin(layout: CondLayout, tokens: int, dim: int, pixels: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A seeded structural stand-in for one sample's conditioning (no text encoder): random encoder states, no padding,
    random vectors for learned extras and the true image size for size extras. Returns (tokens [+1], width)."""
    states = torch.randn(1, tokens, dim, generator=generator)
    sizes = size_extras(*pixels)
    extras = {name: sizes[name] if name in sizes else torch.randn(width, generator=generator) for name, width in layout.extras}
    return layout.pack(states, None, extras)[0]
