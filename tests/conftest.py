from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_models import FAMILY_BUILDERS

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> saved tiny model directory (built once per test session)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build(root / family) for family, build in FAMILY_BUILDERS.items()}


@pytest.fixture(params=sorted(FAMILY_BUILDERS))
def tiny_model_dir(request, tiny_model_dirs) -> Path:
    return tiny_model_dirs[request.param]
