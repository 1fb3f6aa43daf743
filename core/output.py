"""Claiming an output before the long work that fills it: writable, one writer at a time, nothing stale left.

`claim_output(out)` is held by calibrate, export and build for their whole run:
- the output's folder must be writable now (a read-only mount, /proc or a full disk fail here, not after hours);
- an exclusive lock (`flock` on the hidden sibling `.<name>.lock`) refuses a second run on the same output while the
  first is alive; the kernel releases it when its process dies, so a killed run never blocks the next one;
- a full disk or a file system gone read-only during the run is one clear error, not a traceback;
- staging folders and temporary files a killed run left beside the output (`.<name>.*.staging`, `.old`, `.tmp`)
  cannot belong to a live run while the lock is held: they are removed, and the caller is told how much went.
The lock file is removed on release. Re-entrant within a process (staged_directory claims what calibrate claimed).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

STALE_SUFFIXES = (".staging", ".old", ".tmp")
WRITE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EFBIG)
_held: dict[Path, int] = {}  # claimed outputs of this process -> nesting depth


def default_mode(directory: bool) -> int:
    """The permissions a new file or folder gets from the user's umask (tempfile creates 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def unwritable(path: Path, exc: OSError) -> UserError:
    reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
    return UserError(f"Cannot write to {path}: {reason}. Choose a writable output path (--out).")


def check_writable(directory: Path) -> None:
    """Create `directory` if needed and write, sync and remove a probe file in it; a clear UserError if that fails."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".dilatequant-probe.") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise unwritable(directory, exc) from None


def check_writable_file(path: str | Path) -> Path:
    """For a result file written at the end (eval --out, profile --out): its folder is writable now."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; --out takes a file path here.")
    check_writable(path.parent)
    return path


def stale_siblings(out: Path) -> list[Path]:
    """What staged_directory and atomic writes name `.<name>.<8 random characters>.staging|old|tmp` beside `out`."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}({'|'.join(map(re.escape, STALE_SUFFIXES))})")
    return [p for p in out.parent.iterdir() if pattern.fullmatch(p.name)]


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def lock(path: Path) -> int:
    """An exclusive, non-blocking flock on `path`, retried if another process replaced the file meanwhile."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, default_mode(False))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{path.parent / path.name[1:-5]} is being written by another dilatequant run ({owner}). Wait for "
                            "it to finish, or choose another --out.") from None  # fmt: skip
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%H:%M:%S')}: {' '.join(sys.argv[:3])}".encode(), 0)
            return fd
        os.close(fd)  # the file we locked was unlinked by its releasing owner: lock the new one


@contextmanager
def claim_output(out: str | Path, notify=None) -> Iterator[None]:
    """Hold `out` for this run (see the module docstring). `notify(message)` hears what was cleaned up."""
    out = Path(out).absolute()
    if out in _held:
        _held[out] += 1
        try:
            yield
        finally:
            _held[out] -= 1
        return
    check_writable(out.parent)
    lock_path = out.parent / f".{out.name}.lock"
    fd = lock(lock_path)
    _held[out] = 1
    try:
        stale = stale_siblings(out)
        if stale:
            freed = sum(size_of(p) for p in stale)
            for path in stale:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            if notify is not None:
                notify(f"removed {len(stale)} unfinished folder(s) a killed run left beside {out.name} ({freed / 1e6:.1f} MB)")
        yield
    except OSError as exc:
        if exc.errno in WRITE_ERRORS:  # the disk filled (or went read-only) during the run: one line, not a traceback
            raise unwritable(out.parent, exc) from exc
        raise
    finally:
        del _held[out]
        lock_path.unlink(missing_ok=True)
        os.close(fd)
