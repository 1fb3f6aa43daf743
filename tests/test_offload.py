"""Offloaded distillation (calibrate/offload.py): only the running block's tensors are on the device, every tensor
comes back where it was with its values (both on a GPU), and an offloaded calibration writes the same artifact as a resident one
(on CPU here; on a GPU in the `gpu`-marked tests, with its device memory)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dilatequant.calibrate import bkd
from dilatequant.calibrate.bkd import train_block
from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.calibrate.offload import BlockOffload, host_copy, unique_tensors
from dilatequant.core.denoiser import load_model
from dilatequant.core.errors import UserError
from dilatequant.core.families import get_family

TINY = {"samples": 16, "trajectories": 4, "steps": 4, "bkd_iters": 6, "bkd_batch": 8, "act_init": "minmax"}


def artifact_tensors(path) -> dict[str, torch.Tensor]:
    return {**load_file(path / "quant_params.safetensors"), **load_file(path / "model/diffusion_pytorch_model.safetensors")}


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tensor data moves between host and device)")


@pytest.mark.gpu
@CUDA
def test_only_the_running_block_is_on_the_device_and_everything_returns(tiny_model_dirs):
    denoiser = load_model(str(tiny_model_dirs["unet-cond"]), "cpu").denoiser
    model, blocks = denoiser.model, get_family(denoiser.family).blocks(denoiser.model)
    modules, before = dict(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}
    owner = {id(t): name for name in blocks for t in unique_tensors(modules[name])}
    seen: dict[str, set] = {}

    def check(name: str) -> None:
        on_device = {owner[id(t)] for t in unique_tensors(model) if id(t) in owner and t.is_cuda}
        seen[name] = on_device
        rest = [t for t in unique_tensors(model) if id(t) not in owner]
        assert rest and all(t.is_cuda for t in rest)

    with BlockOffload(model, blocks, torch.device("cuda")):
        for name in blocks:  # after the offload's own hooks: the block is loaded when these run
            modules[name].register_forward_pre_hook(lambda *_, n=name: check(n))
        denoiser(torch.randn(2, 4, 16, 16, device="cuda"), torch.tensor([10, 500], device="cuda"),
                 torch.randn(2, 4, 16, device="cuda"))
    assert seen and all(devices == {name} for name, devices in seen.items())
    assert all(t.device.type == "cpu" for t in unique_tensors(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_host_copy_is_an_independent_equal_model(tiny_model_dirs):
    denoiser = load_model(str(tiny_model_dirs["unet"]), "cpu").denoiser
    copy = host_copy(denoiser)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    cond = denoiser.conditioning(torch.tensor([0, 1]))
    assert torch.equal(copy(x, t, cond), denoiser(x, t, cond))
    next(copy.model.parameters()).data.add_(1.0)
    assert not torch.equal(copy(x, t, cond), denoiser(x, t, cond))


@pytest.mark.parametrize("family", ["unet-cond", "dit"])
def test_offloaded_distillation_writes_the_same_artifact(tiny_model_dirs, tmp_path, family):
    paths = {choice: calibrate(tiny_model_dirs[family], CalibConfig.from_bits("W8A8", bkd_offload=choice, **TINY),
                               tmp_path / choice, progress=False) for choice in ("on", "off")}  # fmt: skip
    on, off = artifact_tensors(paths["on"]), artifact_tensors(paths["off"])
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
    runs = {choice: json.loads((path / "calibration.json").read_text())["run"] for choice, path in paths.items()}
    assert runs["on"]["bkd_offload"] is True and runs["off"]["bkd_offload"] is False


def test_an_unknown_offload_choice_is_refused():
    with pytest.raises(UserError, match="bkd_offload='sometimes' is not one of: auto, on, off"):
        CalibConfig(bkd_offload="sometimes")


@pytest.mark.gpu
@CUDA
def test_offloaded_distillation_on_a_gpu_is_identical_and_holds_less(tmp_path):
    from tiny_models import build_model

    # wide channels, 8x8 latents: the weights outweigh the cached activations
    wide = ("UNet2DModel", dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(256, 512),
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                norm_num_groups=32), None)  # fmt: skip
    model = build_model(wide, tmp_path / "wide")
    paths = {choice: calibrate(model, CalibConfig.from_bits("W8A8", bkd_offload=choice, **TINY), tmp_path / choice, "cuda",
                               progress=False) for choice in ("on", "off")}  # fmt: skip
    on, off = artifact_tensors(paths["on"]), artifact_tensors(paths["off"])
    assert all(torch.equal(on[k], off[k]) for k in on)
    held = {c: held_at_starts(p) for c, p in paths.items()}  # resident: both models; offloaded: what is outside the blocks
    assert max(held["on"]) < 0.3 * max(held["off"]), held
    # resident, every block starts with the same tensors on the device, plus the cuBLAS workspaces of the warm-up and
    # capture streams (about 65 MiB each on an H200, made once); a stream per block left one behind per block
    assert max(held["off"]) - min(held["off"]) < 200, held["off"]


def held_at_starts(artifact) -> list[float]:
    """The device memory allocated as each block's distillation began (its count starts once the models are placed)."""
    blocks = json.loads((artifact / "calibration.json").read_text())["statistics"]["blocks"].values()
    return [b["start_cuda_mib"] for b in blocks if "start_cuda_mib" in b]


def test_a_distilled_block_keeps_no_gradients(tiny_model_dirs, tmp_path, monkeypatch):
    # a gradient left on a trained parameter holds its memory (on a GPU, a replayed graph's whole pool) to the end
    trained, left = [], []

    def checked(quantized, block, *args, **kwargs):
        result = train_block(quantized, block, *args, **kwargs)
        trained.append(block)
        left.extend(name for name, p in block.named_parameters() if p.grad is not None)
        return result

    monkeypatch.setattr(bkd, "train_block", checked)
    calibrate(tiny_model_dirs["dit"], CalibConfig.from_bits("W8A8", **TINY), tmp_path / "a", progress=False)
    assert trained and not left
