"""Block offloading for distillation: the models' blocks live in host memory and visit the device only while they run.

Block-wise distillation holds two models (the FP reference and the quantized one); at SDXL size and beyond they, the
optimizer state and the cached activations outgrow a GPU. With offloading, each distillation block's tensors
(parameters, buffers, quantizer tables) are kept in pinned host memory: a block is copied to the device by a
pre-forward hook and dropped after it ran, and the block being distilled stays resident until its training ends, when
its new values are copied back. What lies outside every block (norms, embeddings) stays on the device. The
arithmetic is the same on the same device, so the results equal an unoffloaded run's.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

# auto: offload when the two models' parameters alone would take more than this share of the GPU's memory (the rest
# is for the cached block inputs and targets, activations and the optimizer state)
AUTO_SHARE = 0.5


def unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers, each once (a quantizer shared by several layers is one tensor)."""
    seen: dict[int, torch.Tensor] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


class BlockOffload:
    """Installs the hooks on `model`'s `blocks` (module names) for the life of the context; restores every tensor
    to the device it was on when it ends."""

    def __init__(self, model: nn.Module, blocks: list[str], device: torch.device) -> None:
        modules = dict(model.named_modules())
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", to compare with tensors' devices
        self.blocks = {name: unique_tensors(modules[name]) for name in blocks}
        self.host: dict[int, torch.Tensor] = {}
        self.origin: dict[int, torch.device] = {}
        self.resident_count: Counter[int] = Counter()
        self.modules = {name: modules[name] for name in blocks}
        in_blocks = {id(t) for tensors in self.blocks.values() for t in tensors}
        self.rest = [t for t in unique_tensors(model) if id(t) not in in_blocks]  # on the device throughout
        self.handles: list = []

    def __enter__(self) -> BlockOffload:
        pin = self.device.type == "cuda"
        for name, tensors in self.blocks.items():
            for tensor in tensors:
                if id(tensor) not in self.host:
                    self.origin[id(tensor)] = tensor.device
                    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin).copy_(tensor.data)
                    self.host[id(tensor)] = tensor.data = host
            module = self.modules[name]
            self.handles.append(module.register_forward_pre_hook(lambda *_, t=tensors: self.load(t)))
            self.handles.append(module.register_forward_hook(lambda *_, t=tensors: self.evict(t)))
        for tensor in self.rest:
            self.origin[id(tensor)] = tensor.device
            tensor.data = tensor.data.to(self.device)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        for tensors in self.blocks.values():
            for tensor in tensors:
                tensor.data = self.host[id(tensor)].to(self.origin[id(tensor)])
        for tensor in self.rest:
            tensor.data = tensor.data.to(self.origin[id(tensor)])

    def load(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            if tensor.device != self.device:
                tensor.data = self.host[id(tensor)].to(self.device, non_blocking=True)

    def evict(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            if not self.resident_count[id(tensor)]:
                tensor.data = self.host[id(tensor)]

    @contextmanager
    def resident(self, name: str) -> Iterator[None]:
        """Block `name` stays on the device (it trains); on leaving, its values are copied back to host memory."""
        tensors = self.blocks[name]
        self.load(tensors)
        self.resident_count.update(id(t) for t in tensors)
        try:
            yield
        finally:
            self.resident_count.subtract(id(t) for t in tensors)
            for tensor in tensors:
                self.host[id(tensor)].copy_(tensor.data)
            self.evict(tensors)


class NoOffload:
    """The same interface when everything stays on the device."""

    @contextmanager
    def resident(self, name: str) -> Iterator[None]:
        yield


def host_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters and buffers are in host memory, made without a second copy on the
    device (deepcopy takes each tensor's host copy from the memo)."""
    memo = {}
    for tensor in unique_tensors(module):
        host = tensor.detach().to("cpu", copy=True)  # a copy on CPU too
        memo[id(tensor)] = nn.Parameter(host, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else host
    return copy.deepcopy(module, memo)


def parameter_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in unique_tensors(model))


def should_offload(choice: str, model: nn.Module, device: torch.device) -> bool:
    """Whether distillation offloads: `on`/`off` as given; `auto` on a GPU whose memory the FP reference and the
    quantized model (twice the model's parameters) would fill beyond AUTO_SHARE."""
    if choice != "auto":
        return choice == "on"
    if device.type != "cuda":
        return False
    return 2 * parameter_bytes(model) > AUTO_SHARE * torch.cuda.get_device_properties(device).total_memory


@contextmanager
def offloaded(models: list[nn.Module], blocks: list[str], device: torch.device, enabled: bool) -> Iterator[list]:
    """One BlockOffload per model (the same block names in each), or NoOffloads when not `enabled`."""
    if not enabled:
        yield [NoOffload() for _ in models]
        return
    with ExitStack() as stack:
        yield [stack.enter_context(BlockOffload(model, blocks, device)) for model in models]
