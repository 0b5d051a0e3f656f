"""The sweep as a dependency graph: one `Node` per stage run, what finished means, and the graph's levels."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data import BUILTIN
from utils import UserError

from .grid import Sweep, schedule_tokens

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Node:
    """One stage run: its command, its folder, the runs it needs, and what its summary.json must say.

    The runners read nothing else, so a new kind of run (an assistant teacher, a variant teacher) is one
    more `add` in `build_graph`.
    """

    label: str
    out_dir: Path
    argv: list[str]
    deps: list[Path]
    expect: dict[str, Any]


@dataclass
class Outcome:
    """What a call did; `reproduce.main` returns it so that tests can inspect a sweep in-process.

    `launched` holds the runs started here or, with --slurm, submitted; `jobs` maps each unfinished run's
    folder to its Slurm job (submitted now or already queued) and `report_job` is the job that writes the table.
    """

    nodes: list[Node]
    launched: list[Node] = field(default_factory=list)
    failed: list[Node] = field(default_factory=list)
    skipped: list[Node] = field(default_factory=list)
    table: str = ""
    jobs: dict[Path, str] = field(default_factory=dict)
    report_job: str | None = None


def build_graph(sweep: Sweep) -> list[Node]:
    """Every stage run of the sweep, once each, in dependency order: all teachers, all heads, all students."""
    nodes: dict[Path, Node] = {}

    def add(label: str, script: str, out_dir: Path, epochs: int, seed: int, flags: list[str], deps: list[Path],
            expect: dict[str, Any]) -> None:
        argv = [sys.executable, str(ROOT / script), *flags, *stage_flags(sweep, epochs, seed), "--out_dir",
                str(out_dir), "--resume"]
        expect = {**expect, **hyper_parameters(sweep, epochs, seed)}
        nodes.setdefault(out_dir, Node(label, out_dir, argv, deps, expect))

    for teacher in sweep.teachers:
        for seed in sweep.seeds:
            add(f"teacher {teacher} seed {seed}", "train_teacher.py", sweep.teacher_dir(teacher, seed),
                sweep.teacher_epochs, seed, ["--model", teacher], [], {"stage": "teacher", "model": teacher})
    for teacher in sweep.teachers:
        for seed in sweep.seeds:
            teacher_dir = sweep.teacher_dir(teacher, seed)
            add(f"heads {teacher} seed {seed}", "train_heads.py", sweep.heads_dir(teacher, seed), sweep.heads_epochs,
                seed, ["--teacher", teacher, "--teacher_ckpt", str(teacher_dir / "teacher.pt")], [teacher_dir],
                {"stage": "heads", "model": teacher})
    for student in sweep.students:
        for method in sweep.methods:
            for teacher in sweep.teachers:  # a CE student's folder names no teacher: `add` keeps one node
                for seed in sweep.seeds:
                    out_dir = sweep.student_dir(student, method, teacher, seed)
                    flags, deps = ["--student", student, "--method", method], []
                    expect: dict[str, Any] = {"stage": "student", "model": student, "method": method}
                    if method != "ce":
                        teacher_dir, heads_dir = sweep.teacher_dir(teacher, seed), sweep.heads_dir(teacher, seed)
                        deps = [teacher_dir, heads_dir] if method == "dih" else [teacher_dir]
                        flags += ["--teacher", teacher, "--teacher_ckpt", str(teacher_dir / "teacher.pt")]
                        flags += ["--heads_ckpt", str(heads_dir / "heads.pt")] if method == "dih" else []
                        flags += ["--alpha", str(sweep.alpha), "--temperature", str(sweep.temperature)]
                        expect |= {"teacher": teacher, "alpha": sweep.alpha, "temperature": sweep.temperature}
                    name = f"{method} student {student}" + (f" <- {teacher}" if method != "ce" else "")
                    add(f"{name} seed {seed}", "test_dih.py", out_dir, sweep.epochs, seed, flags, deps, expect)
    return list(nodes.values())


def stage_flags(sweep: Sweep, epochs: int, seed: int) -> list[str]:
    """The flags every stage script takes, spelled out so that each command stands on its own."""
    return [
        "--dataset", sweep.dataset, "--data_dir", sweep.data_dir, "--seed", str(seed), "--epochs", str(epochs),
        "--batch_size", str(sweep.batch_size), "--lr", str(sweep.lr), "--momentum", str(sweep.momentum),
        "--wd", str(sweep.wd), "--nesterov" if sweep.nesterov else "--no-nesterov",
        "--schedule", *schedule_tokens(sweep.schedule), "--gamma", str(sweep.gamma),
    ]


def hyper_parameters(sweep: Sweep, epochs: int, seed: int) -> dict[str, Any]:
    """The engine's settings as summary.json records them (its `config`), to recognise a finished run."""
    return {"seed": seed, "epochs": epochs, "batch_size": sweep.batch_size, "lr": sweep.lr,
            "momentum": sweep.momentum, "wd": sweep.wd, "nesterov": sweep.nesterov, "schedule": sweep.schedule,
            "gamma": sweep.gamma}


def levels(nodes: list[Node]) -> list[list[Node]]:
    """The nodes by depth, in build order within each: a run's level is one past the deepest run it needs."""
    depth: dict[Path, int] = {}
    for node in nodes:  # build_graph lists every node after the nodes it needs
        depth[node.out_dir] = 1 + max((depth[dep] for dep in node.deps), default=-1)
    return [[node for node in nodes if depth[node.out_dir] == level] for level in range(max(depth.values()) + 1)]


def listing(nodes: list[Node]) -> str:
    """--dry_run's output: every stage command by graph level, each followed by the runs it waits for.

    A level needs only the levels above it, so the levels are a job array each for a scheduler; the
    trailing shell comment names the exact runs, for one that takes a full graph. The file stays a
    runnable shell script, in an order that works.
    """
    graph = levels(nodes)
    lines = []
    for number, level in enumerate(graph, 1):
        needs = "that need no other run" if number == 1 else "each after the runs named at its end (of earlier levels)"
        lines.append(f"# level {number} of {len(graph)}: {len(level)} runs {needs}")
        for node in level:
            after = f"  # after {' '.join(dep.name for dep in node.deps)}" if node.deps else ""
            lines.append(shlex.join(node.argv) + after)
    return "\n".join(lines)


def read_summary(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "summary.json"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} cannot be read ({err}); delete it to rerun that stage") from None


def is_finished(node: Node, dataset: str) -> bool:
    """Whether the node's folder holds its finished run; a different run there is refused, never reused."""
    summary = read_summary(node.out_dir)
    if summary is None:
        return False
    recorded = {**summary.get("config", {}), **summary}
    wrong = [key for key, want in node.expect.items() if recorded.get(key) != want]
    if not dataset_matches(recorded.get("dataset", ""), dataset):
        wrong.insert(0, "dataset")
    if wrong:
        key = wrong[0]
        want = dataset if key == "dataset" else node.expect[key]
        raise UserError(f"{node.out_dir} holds another run ({key}={recorded.get(key)!r}, this sweep asks for "
                        f"{want!r}): delete it or choose another --runs_dir")
    return True


def dataset_matches(recorded: str, dataset: str) -> bool:
    """A user's npz is recorded as `npz:<stem>:<hash>` (see data.load_dataset); the others by their name."""
    return recorded == dataset if dataset in BUILTIN else recorded.startswith(f"npz:{Path(dataset).stem}:")
