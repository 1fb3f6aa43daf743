"""End to end on the bundled model: FP sampling through the CLI path must produce recognisable digits."""

import pytest
import torch

from dilatequant.core.denoiser import load_model
from dilatequant.core.evaluate import evaluate
from dilatequant.core.sampling import SamplerConfig


@pytest.mark.slow
def test_digits_class_accuracy_with_20_ddim_steps():
    result = evaluate(load_model("digits"), 100, SamplerConfig(steps=20), torch.device("cpu"), progress=False)
    assert result["class_accuracy"] >= 0.85
