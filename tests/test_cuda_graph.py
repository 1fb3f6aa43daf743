"""Reconstruction steps replayed as CUDA graphs (calibrate/cuda_graph.py): buffers, the ragged-batch fallback,
and on a GPU, that replaying gives what the eager loop gives."""

import json

import pytest
import torch

from dilatequant.calibrate import bkd
from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.contract import load_artifact
from dilatequant.calibrate.cuda_graph import WARMUP, GraphedStep, copy_into, replayable, static_copy
from dilatequant.calibrate.flow import calibrate


def test_static_buffers_take_each_example_in_place():
    example = ({"args": (torch.zeros(2, 3),), "kwargs": {"temb": torch.zeros(2, 4), "scale": 1.0}}, None, torch.zeros(2), [], torch.zeros(2))
    static = static_copy(example)
    buffer = static[0]["kwargs"]["temb"]
    other = ({"args": (torch.ones(2, 3),), "kwargs": {"temb": torch.full((2, 4), 2.0), "scale": 1.0}}, None, torch.ones(2), [], torch.ones(2))
    copy_into(static, other)
    assert static[0]["kwargs"]["temb"] is buffer and buffer.eq(2).all() and static[0]["args"][0].eq(1).all()
    assert example[0]["kwargs"]["temb"].eq(0).all()  # the example itself is untouched


def test_a_ragged_last_batch_is_not_replayable():
    full, ragged = (torch.zeros(4, 3), [torch.zeros(4)]), (torch.zeros(2, 3), [torch.zeros(2)])
    assert replayable([full, full]) and not replayable([full, full, ragged])


def test_the_cpu_loop_records_that_no_graph_ran(tiny_model_dirs, tmp_path):
    config = CalibConfig.from_bits("W8A8", samples=8, trajectories=8, steps=4, bkd_batch=4, bkd_iters=5)
    path = calibrate(tiny_model_dirs["unet"], config, tmp_path / "c", progress=False)
    blocks = json.loads((path / "calibration.json").read_text())["statistics"]["blocks"]
    assert blocks and all(b["cuda_graph"] is False for b in blocks.values())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_a_replayed_step_is_the_eager_step():
    """Float64 (no TF32, deterministic kernels): replays reproduce the eager Adam trajectory to rounding."""
    torch.manual_seed(0)
    data = [(torch.randn(8, 5, dtype=torch.float64, device="cuda"), torch.randn(8, 3, dtype=torch.float64, device="cuda"))
            for _ in range(4)]  # fmt: skip
    models = [torch.nn.Linear(5, 3).double().cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2, capturable=True) for m in models]

    def stepper(model, optimizer):
        def step(example):
            x, y = example
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        return step

    order = [0, 1, 2, 3, 2, 1, 0, 3, 1, 2]
    eager, graphed = stepper(models[0], optimizers[0]), stepper(models[1], optimizers[1])
    replay = GraphedStep(graphed, [data[i] for i in order[:WARMUP]])
    for k, i in enumerate(order):
        eager_loss = eager(data[i])
        if k >= WARMUP:
            assert torch.allclose(replay(data[i]), eager_loss, rtol=1e-12)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("parts", [{}, {"recon_loss": "fbr", "input_mixing": "qdrop", "weight_rounding": "learned-rounding",
                                        "bkd_lr_schedule": "cosine"}])  # fmt: skip
def test_graphed_calibration_learns_like_the_eager_one(tiny_model_dirs, tmp_path, parts):
    """TF32 and Adam's normalised steps make eager and replayed training differ in detail (and the difference
    carries into later blocks' inputs; QDrop's masks differ too): compare the error left over all blocks."""
    common = {"samples": 16, "trajectories": 16, "steps": 4, "bkd_batch": 4, "bkd_iters": 40, **parts}
    left = {}
    for graph in (False, True):
        config = CalibConfig.from_bits("W4A8", bkd_cuda_graph=graph, **common)
        path = calibrate(tiny_model_dirs["unet"], config, tmp_path / str(graph), torch.device("cuda"), progress=False)
        blocks = json.loads((path / "calibration.json").read_text())["statistics"]["blocks"].values()
        assert all(b["cuda_graph"] is graph for b in blocks)
        left[graph] = sum(b["mse_after"] / b["mse_before"] for b in blocks) / len(blocks)
        load_artifact(path).model  # the trained artifact loads
    assert left[True] < 1 and left[True] == pytest.approx(left[False], abs=0.05)


def test_a_block_that_cannot_be_captured_trains_eagerly_with_a_warning(monkeypatch):
    def refuse(step, warmup, after):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(bkd, "GraphedStep", refuse)
    step = lambda example: example  # noqa: E731
    with pytest.warns(UserWarning, match="trains eagerly: operation not permitted"):
        assert bkd.replayed(step, []) is step
