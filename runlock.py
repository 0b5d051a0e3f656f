"""One writer per folder: exclusive POSIX record locks on a lock file, held while a process works there.

A stage run holds `run_folder(out_dir)` from before its data is loaded until it ends, so a second process aimed
at the same run folder (with or without --resume, on this machine or another node of a cluster) is refused with
one line naming the host and PID that hold it. A download waits for the lock of its archive instead
(data/download.py), so concurrent first runs fetch and decode a dataset once; reproduce.py holds one lock per
dataset folder of its runs.

The locks are `fcntl` record locks (`lockf`): the kernel drops them when their process dies, however it dies
(kill -9 included), so a lock never outlives its holder, and NFSv4 carries them to the server, so they hold
across the nodes of a cluster (NFSv3 needs its lock daemon; Lustre the `flock` mount option). A file system
without lock support is reported, never silently ignored. POSIX locks belong to a process, not to a file
descriptor, so a process tracks the locks it holds itself: it may hold several folders at once (one context
each, e.g. in a `contextlib.ExitStack`), but never the same folder twice.

The holder removes its lock file before it lets go, and whoever acquires one checks that the file it locked is
still the one in the folder; so a folder is left as it was found (a folder created only to hold the lock is
removed again), and no two processes can ever hold "the" lock through two different files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import distributed
from utils import UserError

RUN_LOCK = ".run.lock"  # in every run folder while a process works in it
_HELD: set[str] = set()  # the lock files this process holds (POSIX locks cannot tell it apart from itself)


class Busy(UserError):
    """The lock is held by another process; `holder` is what it recorded about itself ("PID 12 on node3, ...")."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder = path, holder


class Unwritable(UserError):
    """The lock file cannot be created or written; `reason` is the OS error."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} cannot be written ({reason})")
        self.path, self.reason = path, reason


def _holder(fd: int) -> str:
    """What the process holding the lock on `fd` wrote into it."""
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "another process (it has not recorded its PID yet)"


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (its last holder removes it before letting go)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


@contextlib.contextmanager
def hold(path: Path, wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if absent) for the duration of the context.

    Held elsewhere: raise `Busy`, or with `wait`, call `wait(holder)` once and block until it is free.
    A file that cannot be created or written raises `Unwritable` (a read-only or full file system, a file-size
    limit, a path under a regular file); a file system without POSIX locks, a `UserError` that says so.
    """
    key = os.path.realpath(path)
    if key in _HELD:
        raise Busy(path, f"this very process (PID {os.getpid()}), which already works there")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise Unwritable(path, _reason(err)) from None
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise UserError(f"cannot lock {path} ({_reason(err)}): its file system does not support POSIX "
                                    "locks (NFSv3 needs its lock daemon, Lustre the flock mount option); use a "
                                    "folder on one that does") from None
                if wait is None:
                    raise Busy(path, _holder(fd)) from None
                wait(_holder(fd))
                fcntl.lockf(fd, fcntl.LOCK_EX)
            if _same_file(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed that file as we opened it: lock the one there now
    try:
        try:
            record = f"PID {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
            os.fsync(fd)
        except OSError as err:
            raise Unwritable(path, _reason(err)) from None
        _HELD.add(key)
        yield
    finally:
        _HELD.discard(key)
        if _same_file(fd, path):  # (unless someone deleted it meanwhile, and another process made a new one)
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: a process waiting on this file then locks a new one
        os.close(fd)  # drops the lock


def _create(folder: Path) -> list[Path]:
    """`mkdir -p folder`; the folders it created, deepest first (to remove them again if they stay empty)."""
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists() or parent.is_symlink():
            break
        missing.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def run_folder(out_dir: Path, flag: str = "--out_dir") -> contextlib.AbstractContextManager:
    """Be the one process writing into the run folder `out_dir`, created if need be, for the whole context.

    Checks on the way that the folder can be written (the lock file is written and flushed), so an unusable
    folder is one line before any data is loaded; a folder created here and left empty is removed again. In a job
    of several processes (torchrun, srun) rank 0, the one that writes, holds it for the whole job; the others wait
    for its answer and stop with its one line if it cannot.
    """
    return distributed.on_rank_zero(_run_folder(out_dir, flag))


@contextlib.contextmanager
def _run_folder(out_dir: Path, flag: str) -> Iterator[None]:
    try:
        created = _create(out_dir)
    except OSError as err:
        raise UserError(f"{flag} {out_dir} cannot be created ({_reason(err)}): choose a writable {flag}") from None
    try:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(hold(out_dir / RUN_LOCK))
            except Busy as busy:
                raise UserError(f"{flag} {out_dir} is in use by {busy.holder}: a run folder has one writer; wait "
                                f"for it to end (or stop it), or choose another {flag}") from None
            except Unwritable as bad:
                raise UserError(f"{flag} {out_dir} cannot be written ({bad.reason}): choose a writable "
                                f"{flag}") from None
            yield
    finally:
        for folder in created:  # deepest first; a folder that holds anything stays
            try:
                folder.rmdir()
            except OSError:
                break

