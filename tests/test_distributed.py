"""Calibration on 2 gloo ranks (torchrun through `calibrate --nproc 2`) against one process, on the tiny UNet:
the same calibration data and initialised tables bit for bit, distillation within its tolerance, rank 0 the only
writer, and a rank killed mid-distillation stopping the other with one clear line and a re-run resuming."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dilatequant.calibrate.distributed import Ranks, without_option

ARGS = ["--bits", "W8A8", "--method", "dilatequant", "--samples", "64", "--trajectories", "64", "--steps", "4",
        "--bkd-batch", "32", "--device", "cpu"]  # fmt: skip
# torchrun gives each rank one thread; one process gets the same, so both compute alike
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
# Records, per process, the file-system changes it makes (Python's audit events): rank 0 alone may write.
AUDIT = """
import atexit, os, sys
if os.environ.get("AUDIT_DIR") and os.environ.get("RANK"):
    changes = []
    def hook(event, args):
        writing = event == "open" and (isinstance(args[1], str) and any(m in args[1] for m in "wax+")
                                       or isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing or event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            changes.extend(os.path.abspath(os.fspath(a)) for a in args[:2] if isinstance(a, (str, os.PathLike)))
    sys.addaudithook(hook)
    atexit.register(lambda: open(os.path.join(os.environ["AUDIT_DIR"], "rank" + os.environ["RANK"]), "w").write("\\n".join(changes)))
"""


def calibrate(model, out, *extra, nproc=1, env=ENV, **popen):
    command = [sys.executable, "-m", "dilatequant", "calibrate", "--model", str(model), *ARGS, *extra, "--nproc", str(nproc), "--out", str(out)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finished(process) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stdout, stderr


def tensors(artifact: Path) -> dict[str, torch.Tensor]:
    return {**load_file(artifact / "quant_params.safetensors"), **load_file(artifact / "model/diffusion_pytorch_model.safetensors")}


def test_two_ranks_record_and_initialise_bit_identically_and_only_rank_0_writes(tiny_model_dirs, tmp_path):
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(textwrap.dedent(AUDIT))
    runs = tmp_path / "runs"
    extra = ("--bkd-iters", "0", "--data-selection", "tdac")  # TDAC: its features come from the first batch, gathered
    one = calibrate(tiny_model_dirs["unet"], runs / "one", *extra)
    two = calibrate(tiny_model_dirs["unet"], runs / "two", *extra, nproc=2,
                    env={**ENV, "AUDIT_DIR": str(audit), "PYTHONPATH": str(audit)})  # fmt: skip
    finished(one), finished(two)
    a, b = tensors(runs / "one"), tensors(runs / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # MSE-searched tables over min/max ranges
    assert (runs / "one/calibration_data.safetensors").read_bytes() == (runs / "two/calibration_data.safetensors").read_bytes()
    record = json.loads((runs / "two/calibration.json").read_text())
    assert record["run"]["world_size"] == 2 and record["run"]["backend"] == "gloo" and len(record["run"]["per_rank"]) == 2
    groups = json.loads((runs / "one/calibration.json").read_text())["statistics"]["groups"]
    assert record["statistics"]["groups"] == groups  # the ranges observed (min/max over channels), all-reduced exactly
    written = {rank: [p for p in (audit / f"rank{rank}").read_text().split("\n") if p.startswith(str(runs))] for rank in (0, 1)}
    assert written[0] and not written[1], written[1][:5]  # rank 0 wrote the work dir and the artifact; rank 1 nothing
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]


def test_a_killed_rank_stops_the_other_with_one_line_and_a_rerun_resumes_within_tolerance(tiny_model_dirs, tmp_path):
    model, bkd = tiny_model_dirs["unet"], ("--bkd-iters", "30")
    one = calibrate(model, tmp_path / "one", *bkd)
    killed = calibrate(model, tmp_path / "two", *bkd, nproc=2)
    work, deadline = tmp_path / "two.work", time.monotonic() + 200
    while len(list(work.glob("block-*.safetensors"))) < 2 and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.05)
    os.kill(rank_process(killed.pid, rank=1), signal.SIGKILL)
    stdout, stderr = killed.communicate(timeout=120)
    done = len(list(work.glob("block-*.safetensors")))
    assert killed.returncode == 1 and 2 <= done < 17 and not (tmp_path / "two").exists(), stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert errors[-1] == ("Error: the calibration on 2 ranks stopped: rank 1 was killed (SIGKILL). Progress is kept in the "
                          "output's .work directory: re-run the same command to resume.")  # fmt: skip

    finished(one)
    stdout, _ = finished(calibrate(model, tmp_path / "two", *bkd, nproc=2))
    assert f"resuming from {work}: calibration data, the activation tables' initialisation, {done} distilled" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no lock, staging or work dir left
    # The tolerance (docs/results/distributed.md): the same data and initialisation, then Adam on gradients summed
    # over ranks in another order; the fake-quant model's error against FP is within 10% of one process's.
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    errors = [fake_quant_error(tmp_path / name, model) for name in ("one", "two")]
    assert abs(errors[1] - errors[0]) <= 0.1 * errors[0], errors


def fake_quant_error(artifact: Path, model: Path) -> float:
    from dilatequant.calibrate.contract import load_artifact
    from dilatequant.core.denoiser import load_model

    fp, quantized = load_model(model, "cpu").denoiser, load_artifact(artifact).model.denoiser
    data = load_file(artifact / "calibration_data.safetensors")
    with torch.no_grad():
        reference = fp(data["x"], data["t"], fp.conditioning(data["labels"]))
        return float((quantized(data["x"], data["t"], quantized.conditioning(data["labels"])) - reference).pow(2).mean())


def rank_process(launcher: int, rank: int) -> int:
    """The pid of the worker of `rank` among the launcher's descendants (torchrun starts each in its own session)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    family, grown = {launcher}, True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in family} - family
        family, grown = family | children, bool(children)
    for pid in family:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no process of rank {rank} found")


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (2, 4)])
def test_rows_and_shards_cover_every_item_once(n, world):
    rows = [Ranks(rank, world).rows(n) for rank in range(world)]
    assert [i for s in rows for i in range(n)[s]] == list(range(n))
    assert sorted(i for rank in range(world) for i in Ranks(rank, world).shard(n)) == list(range(n))


def search_on_a_rank(rank: int, port: int, state: str, results) -> None:
    """One of two gloo ranks running the toy search of test_search.py, each rank counting its evaluations."""
    from test_search import CONFIG, WIDTHS, toy_fitness

    from dilatequant.calibrate.distributed import process_group
    from dilatequant.calibrate.search import search

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    evaluated = []
    with process_group(torch.device("cpu")) as (ranks, _):
        result = search(WIDTHS, lambda g: evaluated.append(g) or toy_fitness(g), CONFIG, state, progress=False, ranks=ranks)
    results[rank] = (result.best, result.evaluations, len(evaluated))


def test_the_group_size_search_on_two_ranks_shares_the_evaluations_and_finds_what_one_finds(tmp_path):
    from test_search import CONFIG, WIDTHS, toy_fitness

    from dilatequant.calibrate.search import search

    context = torch.multiprocessing.get_context("spawn")
    results, port = context.Manager().dict(), 29500 + os.getpid() % 1000
    workers = [context.Process(target=search_on_a_rank, args=(rank, port, str(tmp_path / "state.json"), results)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    one = search(WIDTHS, toy_fitness, CONFIG, progress=False)
    assert [w.exitcode for w in workers] == [0, 0] and results[0][:2] == results[1][:2] == (one.best, one.evaluations)
    assert results[0][2] + results[1][2] == one.evaluations and abs(results[0][2] - results[1][2]) <= CONFIG.generations
    assert json.loads((tmp_path / "state.json").read_text())["generation"] == CONFIG.generations  # rank 0's state


def test_the_launcher_drops_its_own_option():
    assert without_option(["calibrate", "--nproc", "2", "--out", "x", "--nproc=3"], "--nproc") == ["calibrate", "--out", "x"]
