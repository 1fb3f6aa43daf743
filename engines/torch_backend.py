"""The torch backend: every bucket graph of an export run by `TorchGraph`, on a CUDA GPU or the CPU.

A reference, not a deployment target: it executes the deployed Q/DQ graphs exactly as exported (fake
quantization in float, see torch_graph.py), so quality can be measured at large n on a GPU machine without
TensorRT. It is slower than ONNX Runtime on the CPU and is not profiled for latency. "Building" copies the
export's graphs and weights into the engine directory, which then stands on its own like every engine
directory. `provider`: 'auto' (CUDA when torch sees a GPU, else CPU), 'cpu', 'cuda' or 'cuda:N'.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from dilatequant.core.manifest import ArtifactError

from .backend import BucketEngine, BuildContext, cpu_name
from .config import BuildConfig
from .torch_graph import TorchGraph


def torch_device(provider: str) -> torch.device:
    if provider == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(provider)
    except RuntimeError as exc:
        raise ArtifactError(f"--provider {provider} is not a torch device; use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"--provider {provider}: torch sees no CUDA GPU here. Use --provider cpu (or auto).")
    return device


class TorchBackend:
    name = "torch"

    def version(self) -> str:
        return torch.__version__

    def device(self, config: BuildConfig) -> str:
        device = torch_device(config.provider)
        return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else cpu_name()

    def build(self, context: BuildContext) -> dict:
        graphs = context.export_manifest["graphs"]
        for name in [*graphs.values(), context.export_manifest["weights_file"]]:
            shutil.copy2(context.export_dir / name, context.staging / name)
        return {"engines": dict(graphs), "provider": str(torch_device(context.config.provider))}

    def load(self, engine_dir: Path, manifest: dict, bucket: str) -> TorchEngine:
        return TorchEngine(engine_dir / manifest["engines"][bucket], torch_device(manifest["provider"]))


class TorchEngine(BucketEngine):
    """One bucket's graph loaded onto a torch device on activate, dropped on close."""

    def __init__(self, path: Path, device: torch.device) -> None:
        super().__init__(str(path))
        self.path, self.device = path, device
        self.graph: TorchGraph | None = None

    def _activate(self) -> None:
        self.graph = TorchGraph(self.path, self.device)
        self.input_dtypes = {name: torch.empty(0, dtype=dtype).numpy().dtype for name, dtype in self.graph.input_dtypes.items()}

    def _close(self) -> None:
        self.graph = None

    def _infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        output = self.graph(**{name: torch.from_numpy(value) for name, value in feeds.items()})
        return output.float().cpu().numpy()


BACKEND = TorchBackend()
