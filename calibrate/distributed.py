"""Calibration on several processes through torch.distributed: torchrun starts them, NCCL joins GPUs, gloo CPUs.

Every rank holds the whole model and runs every phase, each on its shard of the work, so that the result is the
one process's:
- trajectories: recording batch k is rank k mod N's; the batches are gathered and put in the one process's order;
- activation observers: min/max (and counts) all-reduced, which is exact; the float sums the percentile and MSE
  initialisations are computed from are kept per batch, gathered and added in batch order, as one process adds them;
- block distillation: each batch's rows are split over the ranks and the gradients all-reduced, so every rank
  takes the same Adam steps;
- the group-size search: each rank evaluates its share of a generation's genomes.
Rank 0 alone reads and writes files (the work dir, the artifact); the others get what it read through collectives.
A rank that fails or is killed makes the others stop at their next collective with one line saying so.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dilatequant.core.errors import UserError

T = TypeVar("T")
# How long a rank waits in a collective for the others (rank 0 writing an SD-size artifact takes a minute).
TIMEOUT = timedelta(minutes=30)


class PeerLost(UserError):
    """A collective failed: another rank stopped (an error of its own, a kill) or stopped answering."""


class MainFailed(UserError):
    """Rank 0 failed in a step the others wait on; its own error is the message to read."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the calibration's ranks (one rank, no process group, by default)."""

    rank: int = 0
    world_size: int = 1
    backend: str = "none"
    control: Any = None  # the gloo group for Python objects and floats (None: the default group, gloo itself)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def record(self) -> dict:
        """What the artifact's `run` records."""
        return {"world_size": self.world_size, "backend": self.backend}

    def shard(self, n: int) -> range:
        """This rank's items of n (item k is rank k mod world_size's)."""
        return range(self.rank, n, self.world_size)

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of n rows (the first n mod world_size ranks take one more)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    @contextmanager
    def collective(self, phase: str) -> Iterator[None]:
        """Turn a failed collective into one line: a rank stopped during `phase`."""
        try:
            yield
        except (RuntimeError, dist.DistError) as error:
            raise PeerLost(f"rank {self.rank} of {self.world_size}: another rank stopped during {phase} (it failed: see "
                           "its message; or it was killed, or stopped answering). Progress is kept in the output's .work "
                           "directory: re-run the same command to resume.") from error  # fmt: skip

    def gather(self, value: T, phase: str) -> list[T]:
        """Every rank's `value` (picklable, CPU tensors), in rank order."""
        if not self.active:
            return [value]
        out: list = [None] * self.world_size
        with self.collective(phase):
            dist.all_gather_object(out, value, group=self.control)
        return out

    def in_order(self, value: list[T], n: int, phase: str) -> list[T]:
        """The items of all ranks' shard lists (rank r's list holds items r, r + N, ...) as one list of n."""
        shards = self.gather(value, phase)
        return [shards[k % self.world_size][k // self.world_size] for k in range(n)]

    def map(self, fn: Callable[[Any], T], items: Sequence, phase: str) -> list[T]:
        """[fn(item) for item in items], each rank computing its shard."""
        return self.in_order([fn(items[k]) for k in self.shard(len(items))], len(items), phase)

    def from_main(self, fn: Callable[[], T], phase: str) -> T:
        """fn() run on rank 0 alone (reading or writing files), its result (or its failure) given to every rank."""
        if not self.active:
            return fn()
        box: list = [None]
        error: BaseException | None = None
        if self.main:
            try:
                box[0] = (True, fn())
            except Exception as caught:  # every rank must hear of it, not wait for a broadcast that never comes
                error, box[0] = caught, (False, str(caught))
        with self.collective(phase):
            dist.broadcast_object_list(box, src=0, group=self.control)
        if error is not None:
            raise error
        ok, value = box[0]
        if not ok:
            raise MainFailed(f"rank {self.rank}: stopped, since rank 0 failed during {phase} (rank 0's error says why).")
        return value

    def all_reduce(self, tensors: list[torch.Tensor], op: str, phase: str) -> None:
        """In place, one collective for all of `tensors` (one device, one dtype): op 'sum', 'min' or 'max'."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        with self.collective(phase):
            dist.all_reduce(flat, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(part.view_as(tensor))

    def sum(self, value: float, phase: str) -> float:
        """The sum of every rank's float (in rank order, so every rank gets the same float)."""
        return float(sum(self.gather(value, phase))) if self.active else value


SINGLE = Ranks()


@contextmanager
def process_group(device: torch.device) -> Iterator[tuple[Ranks, torch.device]]:
    """The ranks torchrun started this process among (its WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT), and the
    device this rank calibrates on (CUDA: its LOCAL_RANK's GPU); one process when torchrun did not start it. A process
    group made here (NCCL for CUDA, gloo on CPU) is destroyed on the way out."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield SINGLE, device
        return
    created = not dist.is_initialized()
    if created:
        cuda = device.type == "cuda"
        if cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT, device_id=device if cuda else None)
    backend = dist.get_backend()
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=TIMEOUT)
    yield Ranks(dist.get_rank(), dist.get_world_size(), backend, control), device
    if created:  # not on an error: a collective with a dead rank could hang here
        dist.destroy_process_group()


def launch(nproc: int, args: list[str], device: str) -> None:
    """`dilatequant calibrate --nproc N ...`: the same command on N ranks of this machine, started as `torchrun
    --standalone --nproc-per-node N -m dilatequant ...` starts them; a rank's failure is one line naming it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    gpus = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if gpus and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc} needs {nproc} GPUs, this machine has {torch.cuda.device_count()}; lower --nproc "
                        "or use --device cpu (gloo).")  # fmt: skip
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # the cores, shared
    options = get_args_parser().parse_args([f"--nproc-per-node={nproc}", "--monitor-interval=0.5", "--rdzv-backend=c10d",
                                            "--rdzv-endpoint=localhost:0", f"--rdzv-id={uuid.uuid4()}", "-m", "dilatequant", *args])  # fmt: skip
    config, command, command_args = config_from_args(options)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the failure is said once, below
    try:
        elastic_launch(config, command)(*command_args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode < 0:
            raise UserError(f"the calibration on {nproc} ranks stopped: rank {rank} was killed ({failure.signal_name()}). "
                            "Progress is kept in the output's .work directory: re-run the same command to resume.") from None
        raise UserError(f"the calibration on {nproc} ranks stopped: rank {rank} failed first (status {failure.exitcode}; "
                        "its 'Error:' line above says why).") from None


def without_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE` (the launcher's own option, which the ranks must not see)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out
