"""A reconstruction step (forward, loss, backward, Adam step) captured once as a CUDA graph and replayed.

One block at batch 32 is small work for a GPU: eager PyTorch spends most of an iteration launching a few
hundred kernels from Python. A replay launches them all at once. The arithmetic is the same kernels on the
same buffers; only how they are launched changes. Each replay reads its batch from static buffers, so every
batch must have the same shapes. Adam must be `capturable` (its state and step count stay on the device).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from dilatequant.core.tensors import map_tensors

WARMUP = 3  # eager iterations on a side stream before capture (cuDNN/cuBLAS workspaces, Adam's state)


def static_copy(value: Any) -> Any:
    """A structure like `value` with every tensor cloned: the buffers a graph reads."""
    return map_tensors(torch.Tensor.clone, value)


def copy_into(static: Any, value: Any) -> None:
    """Write `value`'s tensors into the matching buffers of `static` (same structure and shapes)."""
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif isinstance(static, (tuple, list)):
        for s, v in zip(static, value, strict=True):
            copy_into(s, v)
    elif isinstance(static, dict):
        for k, s in static.items():
            copy_into(s, value[k])


@cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The warm-up stream of `device`, one for the whole run: PyTorch keeps a cuBLAS workspace per stream until exit
    (about 65 MiB on an H200), so a new stream per block held 1.9 GiB more by the end of an SD-1.5-size calibration."""
    return torch.cuda.Stream(device)


def replayable(examples: list[Any]) -> bool:
    """Whether one set of static buffers fits every example (a ragged last batch does not)."""
    def shapes(example: Any) -> Any:
        return map_tensors(lambda t: (tuple(t.shape), t.dtype), example)

    first = shapes(examples[0])
    return all(shapes(e) == first for e in examples[1:])


class GraphedStep:
    """`step(example) -> loss`, run WARMUP times eagerly on `warmup` examples, then captured and replayed; `after`
    (e.g. a gradient all-reduce and the optimizer's step) runs eagerly after each step, outside the graph."""

    def __init__(self, step: Callable[[Any], torch.Tensor], warmup: list[Any], after: Callable[[], None] | None = None) -> None:
        self.static, self.after = static_copy(warmup[0]), after
        side = side_stream(torch.device("cuda", torch.cuda.current_device()))
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for example in warmup:
                copy_into(self.static, example)
                step(self.static)
                if after is not None:
                    after()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = step(self.static)

    def __call__(self, example: Any) -> torch.Tensor:
        copy_into(self.static, example)
        self.graph.replay()
        if self.after is not None:
            self.after()
        return self.loss
