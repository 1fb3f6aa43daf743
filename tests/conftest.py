from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import TINY_CONFIGS, build_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> saved tiny model directory (built once per test session)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(family, root / family) for family in TINY_CONFIGS}


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model_dir(request, tiny_model_dirs) -> Path:
    return tiny_model_dirs[request.param]


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory) -> dict[str, Path]:
    """kind (sd, sdxl, pixart) -> saved tiny text-to-image pipeline directory (built once per test session)."""
    from tiny_models import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {kind: build_tiny_pipeline(kind, root / kind) for kind in ("sd", "sdxl", "pixart")}
