"""eval's lpips_vs_ref: torchmetrics' LPIPS (AlexNet), offline. Without the backbone weights (or packages) the report
says why in one line and nothing is downloaded; with a stand-in backbone the metric behaves as LPIPS must."""

import json
import socket

import pytest
import torch
from click.testing import CliRunner

from dilatequant.core import metrics
from dilatequant.core.digits_data import load_digits_images
from dilatequant.core.evaluate import score
from dilatequant.core.metrics import LpipsUnavailable, alexnet_weights_path, lpips_input, lpips_vs_ref
from dilatequant.tools.cli import cli

WEIGHTS_NAME = "alexnet-owt-7be5be79.pth"


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME; torch's downloader and socket connections are recorded (and refused): the tests assert
    that none was attempted, since lpips_vs_ref turns a failed load into lpips_skipped."""
    home = tmp_path / "torch_home"
    home.mkdir()
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("LPIPS tried to reach the network")

    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.set_dir would win over TORCH_HOME
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    metrics._lpips_metric.cache_clear()
    yield home
    metrics._lpips_metric.cache_clear()
    assert attempts == [], "a network call was attempted"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def digits(n: int = 6) -> torch.Tensor:
    return load_digits_images()[0][:n]


def test_the_weights_path_follows_torch_home(offline_torch_home):
    assert alexnet_weights_path() == offline_torch_home / "hub" / "checkpoints" / WEIGHTS_NAME


def test_lpips_input_repeats_grayscale_and_upsamples_32px_digits_to_64():
    images = digits(3)
    assert images.shape[1:] == (1, 32, 32)
    prepared = lpips_input(images)
    assert prepared.shape == (3, 3, 64, 64)
    assert torch.equal(prepared[:, 0], prepared[:, 1]) and torch.equal(prepared[:, 0], prepared[:, 2])
    assert prepared.min() >= -1 and prepared.max() <= 1
    assert lpips_input(torch.zeros(2, 3, 64, 96)).shape == (2, 3, 64, 96)  # large enough: untouched
    assert lpips_input(torch.zeros(2, 3, 16, 32)).shape == (2, 3, 64, 128)  # the short side reaches 64


def test_without_the_weights_eval_reports_lpips_skipped_in_one_line_and_downloads_nothing(offline_torch_home):
    images = digits()
    result = score(images, torch.arange(len(images)), images.flip(0), lpips=True)
    assert "psnr_vs_ref" in result and "lpips_vs_ref" not in result
    skipped = result["lpips_skipped"]
    assert "\n" not in skipped and WEIGHTS_NAME in skipped and str(offline_torch_home / "hub" / "checkpoints") in skipped
    assert list(offline_torch_home.iterdir()) == []  # torchvision's loader would have created hub/checkpoints
    assert not {"lpips_vs_ref", "lpips_skipped"} & score(images, torch.arange(len(images)), images.flip(0)).keys()  # opt-in


def test_the_eval_command_prints_the_one_line_and_no_traceback(offline_torch_home, tiny_model_dirs):
    model = tiny_model_dirs["unet"]
    result = invoke("eval", "--model", model, "--ref", model, "--n", 2, "--steps", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert "lpips_vs_ref" not in record and WEIGHTS_NAME in record["lpips_skipped"] and record["psnr_vs_ref"] >= 99
    notes = [line for line in result.stderr.splitlines() if line.startswith("Note: no lpips_vs_ref")]
    assert notes == [f"Note: no lpips_vs_ref: {record['lpips_skipped']}"] and "Traceback" not in result.output
    assert list(offline_torch_home.iterdir()) == []


def test_latent_channels_are_refused_before_anything_loads(offline_torch_home):
    with pytest.raises(LpipsUnavailable, match="1- or 3-channel images"):
        lpips_vs_ref(torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 16, 16))
    with pytest.raises(ValueError, match="paired images of one shape"):
        lpips_vs_ref(torch.zeros(2, 1, 16, 16), torch.zeros(3, 1, 16, 16))


def torchvision_or_skip():
    try:
        import torchmetrics  # noqa: F401
        import torchvision
    except Exception as exc:  # not only ImportError: a CUDA torchvision beside a CPU torch raises RuntimeError
        pytest.skip(f"needs torchmetrics and a torchvision that loads with torch {torch.__version__} ({type(exc).__name__}: {exc})")
    return torchvision


@pytest.fixture
def stand_in_backbone(offline_torch_home):
    """The real AlexNet weights cannot be fetched here: a randomly initialised torchvision AlexNet's state_dict is
    written where torchvision looks for alexnet-owt-7be5be79.pth. No hash check needs bypassing: torch.hub's
    load_state_dict_from_url checks the hash (torchvision passes check_hash=True) only when it downloads, and the
    downloader is a test failure here (offline_torch_home). LPIPS's linear layers are torchmetrics' real ones."""
    torchvision = torchvision_or_skip()
    torch.manual_seed(0)
    path = alexnet_weights_path()
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


def test_lpips_properties_with_a_stand_in_backbone(stand_in_backbone):
    x = digits(8)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=generator)
    slightly, badly = (x + 0.05 * noise).clamp(-1, 1), (x + 0.5 * noise).clamp(-1, 1)
    assert lpips_vs_ref(x, x) == pytest.approx(0.0, abs=1e-6)
    assert lpips_vs_ref(x, slightly) == pytest.approx(lpips_vs_ref(slightly, x), abs=1e-6)
    assert 0 < lpips_vs_ref(x, slightly) < lpips_vs_ref(x, badly)
    rgb = x.repeat(1, 3, 1, 1)  # grayscale is repeated to 3 channels, so the RGB copy scores the same
    assert lpips_vs_ref(rgb, (x + 0.5 * noise).clamp(-1, 1).repeat(1, 3, 1, 1)) == pytest.approx(lpips_vs_ref(x, badly), rel=1e-5)
    # the mean over pairs: one batch of 8 equals the average of its pairs scored one by one (LPIPS_BATCH splits too)
    singles = [lpips_vs_ref(x[i : i + 1], badly[i : i + 1]) for i in range(len(x))]
    assert lpips_vs_ref(x, badly) == pytest.approx(sum(singles) / len(singles), rel=1e-5)


def test_a_corrupt_weights_file_is_one_line_not_a_traceback(offline_torch_home):
    torchvision_or_skip()
    path = alexnet_weights_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    images = digits()
    result = score(images, torch.arange(len(images)), images.flip(0), lpips=True)
    assert "lpips_vs_ref" not in result and result["lpips_skipped"].startswith(f"LPIPS could not load {path} (")
    assert "\n" not in result["lpips_skipped"]


def test_eval_reports_lpips_vs_ref_with_a_stand_in_backbone(stand_in_backbone, tiny_model_dirs):
    model = tiny_model_dirs["unet"]  # 1x16x16 samples: repeated to RGB and upsampled to 64x64
    result = invoke("eval", "--model", model, "--ref", model, "--n", 2, "--steps", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert "lpips_skipped" not in record and record["lpips_vs_ref"] == pytest.approx(0.0, abs=1e-6)  # same model, same noise
    assert "as does lpips_vs_ref" in result.stderr and "Note: no lpips_vs_ref" not in result.stderr
