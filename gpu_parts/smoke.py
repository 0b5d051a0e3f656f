"""The smoke part: does every stage and method run on this device, eager, under CUDA graphs and torch.compile?"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods import METHODS

from .common import Context, launch, log_tail, tiny_npz


@dataclass(frozen=True)
class Smoke:
    """One smoke entry: a stage script with its own flags, and the entries whose eager outputs it reads."""

    name: str
    argv: list[str]
    needs: tuple[str, ...] = ()
    group: tuple[str, ...] = ()  # several --method: one student folder each, under the entry's folder

    def out_flags(self, folder: Path) -> list[str]:
        if not self.group:
            return ["--out_dir", str(folder)]
        return [flag for method in self.group for flag in (f"--{method}.out_dir", str(folder / method))]

    def runs(self, folder: Path) -> list[Path]:
        return [folder / method for method in self.group] or [folder]


SMOKE_MODES = ("off", "graphs", "on")  # --compile: eager, CUDA graphs, torch.compile
# What a few steps need of some methods: FitNets' hint phase shortened to one epoch (so its phase switch runs), CRD's
# negatives cut to 64 (its in-graph sampling and bank update run all the same).
SMOKE_FLAGS = {"fitnets": ["--hint_epochs", "1"], "crd": ["--nce_k", "64"]}
GROUP = ("kd", "crd", "dih")  # one student of each kind of teacher signal: logits, features (own stream), heads


def smoke_table(work: Path) -> list[Smoke]:
    """Both teachers, the heads, every method of `METHODS` (each with the teacher it learns from), and one group.
    Entries read the outputs of the eager runs they need."""
    def out(name: str, file: str) -> str:
        return str(work / f"{name}-off" / file)

    plain = ["--teacher", "res8", "--teacher_ckpt", out("teacher", "teacher.pt")]
    heads = ["--heads_ckpt", out("heads", "heads.pt")]
    student = ["test_dih.py", "--student", "res8", "--method"]
    entries = [
        Smoke("teacher", ["train_teacher.py", "--model", "res8"]),
        Smoke("tofd_teacher", ["train_teacher.py", "--model", "res8", "--tofd"]),
        Smoke("heads", ["train_heads.py", *plain], ("teacher",)),
    ]
    for name, method in METHODS.items():
        argv, needs = [*student, name, *SMOKE_FLAGS.get(name, [])], []
        if method.teacher == "tofd":
            argv += ["--teacher", "res8", "--teacher_ckpt", out("tofd_teacher", "teacher.pt")]
            needs.append("tofd_teacher")
        elif method.teacher != "none":
            argv += plain
            needs.append("teacher")
        if method.heads:
            argv += heads
            needs.append("heads")
        if method.assistant:  # KD's student serves as the assistant
            argv += ["--ta", "res8", "--ta_ckpt", out("kd", "student.pt")]
            needs.append("kd")
        entries.append(Smoke(name, argv, tuple(needs)))
    # One process, one teacher pass per batch for three students (CRD's random stream swapped in between).
    entries.append(Smoke("group", [*student, *GROUP, *plain, *heads, *SMOKE_FLAGS["crd"]], ("teacher", "heads"),
                         group=GROUP))
    return entries


def smoke_result(work: Path, entry: Smoke, mode: str, returncode: int, seconds: float) -> dict[str, Any]:
    """One entry's row: it ran to the end with a finite loss; under graphs, captured and replayed every step after
    the warm-ups (the counts the engine recorded in summary.json; a group's: each student's, summed)."""
    row: dict[str, Any] = {"entry": entry.name, "compile": mode, "ok": False, "seconds": round(seconds, 1)}
    runs = entry.runs(work / f"{entry.name}-{mode}")
    if returncode != 0 or not all((run / "summary.json").exists() for run in runs):
        return row | {"note": f"exit {returncode}: {log_tail(work, f'{entry.name}-{mode}')}"}
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    losses = [[json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in runs]
    row |= {"train_loss": " ".join(f"{each[-1]:.4f}" for each in losses),
            "test_acc": " ".join(f"{summary['final_test_acc']:.2f}" for summary in summaries)}
    finite = all(math.isfinite(loss) for each in losses for loss in each)
    if mode == "graphs":
        graphs: collections.Counter[str] = collections.Counter()
        for summary in summaries:
            graphs.update(summary.get("cuda_graphs", {}))
        row["graphs"] = "{steps} steps: {warmups} warm-up, {captures} captured, {replays} replayed".format_map(graphs)
        replayed = all(summary.get("cuda_graphs", {}).get("replays", 0) >= 1 for summary in summaries)
        row["ok"] = finite and replayed and graphs["replays"] == graphs["steps"] - graphs["warmups"]
    else:
        row["ok"] = finite
    return row


def smoke(ctx: Context) -> Iterator[dict[str, Any]]:
    """The smoke table under each --compile mode (eager first), several entries at once, each when its needs are done.

    A few steps each: 128 images (dry run: 64) in batches of 32, two epochs with an LR drop between them (graphs are
    recaptured), FitNets one hint epoch before them."""
    ctx.work.mkdir(parents=True, exist_ok=True)
    train, test, slots = (128, 64, 8) if ctx.gpu else (64, 32, 2)
    data = tiny_npz(ctx, train, test)
    common = ["--dataset", data, "--epochs", "2", "--schedule", "1", "--batch_size", "32", "--gpu_id", ctx.gpu_id]
    table = smoke_table(ctx.work)
    modes = SMOKE_MODES if ctx.gpu else SMOKE_MODES[:1]
    pending = [(entry, mode) for mode in modes for entry in table]
    if ctx.dry:
        yield {"note": "CPU dry run: eager entries only (--compile graphs needs a GPU, --compile on takes minutes "
                       "per entry on a CPU)"}
    done: dict[str, bool] = {}  # eager entries: whether they succeeded
    running: dict[subprocess.Popen, tuple[Smoke, str, float]] = {}
    threads = max(1, (os.cpu_count() or 1) // slots)
    compile_threads = {"TORCHINDUCTOR_COMPILE_THREADS": str(threads)}  # the slots' compilers share the cores
    while pending or running:
        for entry, mode in list(pending):
            if len(running) >= slots:
                break
            if any(done.get(need) is False for need in entry.needs):
                pending.remove((entry, mode))
                yield {"entry": entry.name, "compile": mode, "ok": False,
                       "note": f"not run: needs {', '.join(entry.needs)}, which failed"}
            elif all(done.get(need) for need in entry.needs):
                pending.remove((entry, mode))
                argv = [*entry.argv, *common, "--compile", mode, *entry.out_flags(ctx.work / f"{entry.name}-{mode}")]
                running[launch(argv, ctx.work, f"{entry.name}-{mode}", threads, compile_threads)] = (
                    entry, mode, time.monotonic())
        for proc in [proc for proc in running if proc.poll() is not None]:
            entry, mode, started = running.pop(proc)
            row = smoke_result(ctx.work, entry, mode, proc.returncode, time.monotonic() - started)
            if mode == "off":
                done[entry.name] = row["ok"]
            yield row
        time.sleep(0.05)

