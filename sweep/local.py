"""The graph on this machine: each stage run as a process, as soon as the runs it needs have finished."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import runlock
from utils import UserError, check_writable_dir, resolve_device

from .graph import Node, Outcome, finished_runs, read_summary


def parse_gpus(text: str | None) -> list[str | None]:
    """`0,1` → ['0', '1'], each checked to exist; no flag → [None]: each script picks its own device."""
    if text is None:
        return [None]
    gpus = [part.strip() for part in text.split(",")]
    if not all(gpus) or len(set(gpus)) != len(gpus):
        raise UserError(f"--gpus {text!r}: give distinct GPU indices separated by commas, e.g. --gpus 0,1")
    for gpu in gpus:
        try:
            resolve_device(gpu)
        except UserError as err:
            raise UserError(f"--gpus {text}: {err}") from None
    return gpus


def gpu_groups(gpus: list[str | None], processes: int, jobs: int) -> list[str | None]:
    """The GPUs of --gpus (parsed) as one entry per device slot: each GPU alone, or with --gpus_per_run N > 1
    consecutive groups of N ("0,1"), which a run's processes see as its CUDA_VISIBLE_DEVICES; None: the run's own
    choice (a run of N processes takes the first N GPUs)."""
    if processes == 1:
        return gpus
    if gpus == [None]:
        if jobs > 1:
            raise UserError(f"--jobs {jobs} runs of --gpus_per_run {processes} would share the first {processes} GPUs: "
                            "list the GPUs to spread them over with --gpus")
        return gpus
    if any(gpu.strip().lower() == "cpu" for gpu in gpus):
        raise UserError("--gpus lists GPUs to group for --gpus_per_run; for runs on the CPU leave --gpus out")
    if len(gpus) % processes:
        raise UserError(f"--gpus {','.join(gpus)}: {len(gpus)} GPUs do not make groups of --gpus_per_run {processes}")
    return [",".join(gpus[i:i + processes]) for i in range(0, len(gpus), processes)]


def torchrun_argv(argv: list[str], processes: int) -> list[str]:
    """`argv` (python SCRIPT ...) as `torchrun --standalone --nproc_per_node N SCRIPT ...` (torch.distributed.run
    under the same interpreter; --standalone: a free port of this machine for each run)."""
    return [argv[0], "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *argv[1:]]


def execute(
    nodes: list[Node], dataset: str, jobs: int, gpus: list[str | None], log: Callable[[str], None] = print,
    processes: int = 1,
) -> Outcome:
    """Run the unfinished nodes, each as soon as the runs it needs have finished and those it comes after
    (`Node.after`: a group's DIH heads) have ended either way, `jobs` at once per device (each
    run on `processes` processes under torchrun where more than 1: `gpus` are then groups of GPUs, `gpu_groups`).

    A failed node's dependents are skipped; the others go on. Output goes to log.txt and stderr.txt in
    each node's folder; the terminal gets one line per start and finish.
    """
    outcome = Outcome(nodes)
    done = finished_runs(nodes, dataset)
    pending = [node for node in nodes if not set(node.runs) <= done]
    runs = sum(len(node.runs) for node in nodes)
    log(f"{runs} stage runs in {len(nodes)} processes, {len(done)} runs already finished, {len(pending)} processes "
        "to run")
    slots = [gpu for _ in range(jobs) for gpu in gpus]  # round-robin over the GPUs
    free = list(range(len(slots)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if len(slots) * processes > 1 and "OMP_NUM_THREADS" not in env:  # concurrent CPU processes would oversubscribe
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (len(slots) * processes)))
    blocked: set[Path] = set()  # runs that failed or could not start
    running: dict[int, tuple[Node, subprocess.Popen, int, float]] = {}
    try:
        while pending or running:
            for node in list(pending):
                if any(dep in blocked for dep in node.deps):
                    pending.remove(node)
                    blocked |= set(node.runs) - done
                    outcome.skipped.append(node)
                    log(f"skip   {node.label}: a run it needs failed")
                elif free and all(dep in done for dep in node.deps) and all(
                        run in done or run in blocked for run in node.after):  # what it comes after has ended
                    pending.remove(node)
                    slot = free.pop(0)
                    with signals_deferred():  # a run is listed (to be stopped on SIGINT/SIGTERM) as it starts
                        running[slot] = (node, *launch(node, slots[slot], env, processes), time.perf_counter())
                    outcome.launched.append(node)
                    device = f" on GPU {slots[slot]}" if slots[slot] is not None else ""
                    log(f"start  {node.label}{device} -> {node.out_dir}")
            time.sleep(0.1)
            for slot, (node, process, err_offset, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[slot]
                free.append(slot)
                seconds = time.perf_counter() - started
                summaries = {out_dir: read_summary(out_dir) for out_dir in node.runs}
                done |= {out_dir for out_dir, summary in summaries.items() if summary is not None}
                if process.returncode == 0 and None not in summaries.values():
                    accuracy = ", ".join(f"{summary['final_test_acc']:.2f}%" for summary in summaries.values())
                    log(f"done   {node.label}: final test acc {accuracy} ({seconds:.0f} s)")
                else:
                    blocked |= set(node.runs) - done
                    outcome.failed.append(node)
                    log(f"FAILED {node.label} (exit {process.returncode}, {seconds:.0f} s): {shlex.join(node.argv)}")
                    for line in stderr_tail(node.out_dir / "stderr.txt", err_offset):
                        log(f"       | {line}")
    finally:  # interrupted (SIGINT, SIGTERM, an error): leave no stage run writing into a run folder
        with signals_deferred():  # a second Ctrl-C waits until they are all stopped
            stop([process for _, process, _, _ in running.values()])
    return outcome


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block take effect at its end. (Not by blocking them: a process
    started in the block would inherit the blocked mask, and could not be stopped.)"""
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


def stop(processes: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """End stage runs and everything they started (each leads a process group of its own): SIGTERM, which they
    answer by letting go of their run folder at once, then SIGKILL for any still there after `grace_s`."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """One sweep at a time per dataset folder: a second one would only find its runs' folders locked."""
    check_writable_dir(folder, "--runs_dir")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(runlock.hold(folder / ".reproduce.lock"))
        except runlock.Busy as busy:
            raise UserError(f"another reproduce.py is running in {folder} ({busy.holder}); let it finish "
                            "first") from None
        yield


def launch(node: Node, gpu: str | None, env: dict[str, str], processes: int = 1) -> tuple[subprocess.Popen, int]:
    """Start a node's command, appending to its logs; return the process and where its stderr starts. `gpu`: its
    GPU, or with `processes` > 1 its group of GPUs (the processes of a torchrun see only those).

    Each run leads a session and process group of its own: a Ctrl-C in the terminal reaches reproduce.py alone,
    which then stops every run with all it started (`stop`). Should reproduce.py itself be killed outright
    (SIGKILL, the OOM killer), no `finally` runs: on Linux the kernel then sends each run SIGTERM
    (`terminate_with_parent`), so no orphan goes on writing into a run folder.
    """
    node.out_dir.mkdir(parents=True, exist_ok=True)
    if processes > 1:
        argv = torchrun_argv(node.argv, processes)
        env = env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu}
    else:
        argv = node.argv + (["--gpu_id", gpu] if gpu is not None else [])
    with open(node.out_dir / "log.txt", "a") as out, open(node.out_dir / "stderr.txt", "a") as err:
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, start_new_session=True,
                                   preexec_fn=terminate_with_parent())
        return process, err.tell()


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@functools.cache
def libc_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once (find_library runs a process); None where there is none (not Linux)."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def terminate_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel send the child SIGTERM when this process dies, however it dies
    (prctl's PR_SET_PDEATHSIG); None where there is no such call (not Linux): there only a clean exit of
    reproduce.py stops its runs.

    libc is looked up here, in the parent: between fork and exec the child should do no more than the call.
    """
    prctl = libc_prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the call: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def stderr_tail(path: Path, offset: int, lines: int = 8) -> list[str]:
    with open(path, errors="replace") as f:
        f.seek(offset)
        return f.read().splitlines()[-lines:]
