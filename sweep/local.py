"""The graph on this machine: each stage run as a process, as soon as the runs it needs have finished."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from utils import UserError, resolve_device

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


def execute(
    nodes: list[Node], dataset: str, jobs: int, gpus: list[str | None], log: Callable[[str], None] = print
) -> Outcome:
    """Run the unfinished nodes, each as soon as the runs it needs have finished, `jobs` at once per device.

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
    if len(slots) > 1 and "OMP_NUM_THREADS" not in env:  # concurrent CPU runs would oversubscribe the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(slots)))
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
                elif free and all(dep in done for dep in node.deps):
                    pending.remove(node)
                    slot = free.pop(0)
                    running[slot] = (node, *launch(node, slots[slot], env), time.perf_counter())
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
    finally:
        for _, process, _, _ in running.values():  # interrupted: leave no orphan writing into a run folder
            process.terminate()
            process.wait()
    return outcome


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """One sweep at a time per dataset folder: two would train a shared run into the same folder at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".reproduce.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another reproduce.py is running in {folder}; let it finish first") from None
        yield


def launch(node: Node, gpu: str | None, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """Start a node's command, appending to its logs; return the process and where its stderr starts."""
    node.out_dir.mkdir(parents=True, exist_ok=True)
    argv = node.argv + (["--gpu_id", gpu] if gpu is not None else [])
    with open(node.out_dir / "log.txt", "a") as out, open(node.out_dir / "stderr.txt", "a") as err:
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        return subprocess.Popen(argv, stdout=out, stderr=err, env=env), err.tell()


def stderr_tail(path: Path, offset: int, lines: int = 8) -> list[str]:
    with open(path, errors="replace") as f:
        f.seek(offset)
        return f.read().splitlines()[-lines:]
