"""A wheel built from the repo installs into a fresh venv, runs the CLI and loads the bundled model."""

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fresh_venv_with_wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", REPO],
                   check=True, capture_output=True)  # fmt: skip
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    # Dependencies (torch, diffusers, ...) come from this environment; dilatequant only from the wheel.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((root / "dist").glob("dilatequant-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], check=True,
                   capture_output=True)  # fmt: skip
    return env_dir


def test_wheel_cli_help(fresh_venv_with_wheel):
    result = subprocess.run([fresh_venv_with_wheel / "bin" / "dilatequant", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "inspect" in result.stdout


def test_wheel_loads_its_bundled_models(fresh_venv_with_wheel):
    code = ("import dilatequant.tools as t; from dilatequant.core.denoiser import load_model; "
            "print(t.__file__); [print(load_model(name).model_dir) for name in ('digits', 'digits-dit')]")  # fmt: skip
    # cwd outside the repo: from its root, `dilatequant/` itself would be imported
    result = subprocess.run([fresh_venv_with_wheel / "bin" / "python", "-c", code], capture_output=True, text=True,
                            cwd=fresh_venv_with_wheel)  # fmt: skip
    assert result.returncode == 0, result.stderr
    module_file, *model_dirs = result.stdout.split()
    assert len(model_dirs) == 2 and all(str(fresh_venv_with_wheel) in path for path in [module_file, *model_dirs])


def test_wheel_ships_the_arena_pages(fresh_venv_with_wheel):
    """The arena's static pages are package data: an installed arena serves its vote page and leaderboard."""
    code = "from dilatequant.tools.arena.app import page; print(len(page('index.html')), len(page('leaderboard.html')))"
    result = subprocess.run([fresh_venv_with_wheel / "bin" / "python", "-c", code], capture_output=True, text=True,
                            cwd=fresh_venv_with_wheel)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert all(int(size) > 1000 for size in result.stdout.split())
