"""Reproduce a table of the paper in one command: a resumable sweep over teachers, methods and seeds.

    python reproduce.py --preset paper-cifar100 --jobs 2 --gpus 0,1
    python reproduce.py --preset demo                     # synthetic data: minutes on a laptop CPU
    python reproduce.py --preset paper-cifar10 --dry_run  # the stage commands, for a cluster's job array

The sweep is a dependency graph of stage runs: each teacher is trained once per seed, its heads once,
then every student (the CE baseline needs no teacher, so one CE run per student and seed serves every
teacher's row). Each run is one call of a stage script, always with --resume, in the folder that
script would choose itself, re-rooted under --runs_dir. A finished run is skipped without starting a
process and an interrupted one continues where it stopped, so rerunning the same command after a
crash finishes the table, and otherwise costs seconds. The table and plots go to
--results_dir/<preset>/: final-epoch test accuracy, mean ± sample std over seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import cli
from data import BUILTIN, dataset_tag
from methods import run_name
from models import MODEL_NAMES
from utils import UserError, atomic_write_text, parse_schedule, resolve_device

ROOT = Path(__file__).resolve().parent
METHODS = ("ce", "kd", "dih")

# SPEC section 1 (the original's Table 2): the same optimiser settings for all three stages.
PAPER = {
    "students": ["res8"], "methods": list(METHODS), "seeds": [30, 50, 67], "epochs": 200, "batch_size": 64,
    "lr": 0.1, "momentum": 0.9, "wd": 5e-4, "nesterov": True, "schedule": [60, 120, 180], "gamma": 0.1,
    "alpha": 0.1, "temperature": 5.0,
}
# Table 1's teachers (SPEC section 1). ResNet-8 is among its CIFAR ResNets, but it is the student here:
# distilling res8 into res8 is no row of the paper's table.
TABLE1_TEACHERS = ["res14", "res20", "res32", "res56", "res110", "res18", "res34", "vgg11", "wrn_28_2"]
PRESETS: dict[str, dict[str, Any]] = {
    # Sized for `make demo` on 2 CPU cores: ten stage runs in about six minutes (an epoch of res20 takes
    # ~25 s there, of res8 ~10 s). A short run wants a gentler LR, then a tenth of it for the last epoch.
    "demo": {
        "dataset": "synthetic", "teachers": ["res20"], "students": ["res8"], "methods": list(METHODS),
        "seeds": [30, 50], "epochs": 2, "heads_epochs": 1, "lr": 0.05, "schedule": [1],
    },
    "paper-cifar100": {**PAPER, "dataset": "cifar100", "teachers": TABLE1_TEACHERS},
    "paper-cifar10": {**PAPER, "dataset": "cifar10", "teachers": TABLE1_TEACHERS},
}
# Without a preset: the paper's settings on CIFAR-100, for the teachers named by --teachers.
DEFAULTS: dict[str, Any] = {
    **PAPER, "dataset": "cifar100", "data_dir": "./data", "teachers": [], "teacher_epochs": None,
    "heads_epochs": None,
}


@dataclass(frozen=True)
class Sweep:
    """What to run: the grid and the hyper-parameters every stage run gets."""

    name: str
    dataset: str
    data_dir: str
    teachers: list[str]
    students: list[str]
    methods: list[str]
    seeds: list[int]
    epochs: int
    teacher_epochs: int
    heads_epochs: int
    batch_size: int
    lr: float
    momentum: float
    wd: float
    nesterov: bool
    schedule: list[int]
    gamma: float
    alpha: float
    temperature: float
    runs_dir: Path
    results_dir: Path

    def run_dir(self, name: str, seed: int) -> Path:
        """The stage scripts' own default folder for a run (`cli.default_dir`), under --runs_dir."""
        return self.runs_dir / cli.default_dir(dataset_tag(self.dataset), name, seed).relative_to("runs")

    def teacher_dir(self, teacher: str, seed: int) -> Path:
        return self.run_dir(f"teacher-{teacher}", seed)

    def heads_dir(self, teacher: str, seed: int) -> Path:
        return self.run_dir(f"heads-{teacher}", seed)

    def student_dir(self, student: str, method: str, teacher: str, seed: int) -> Path:
        """test_dih.py's own folder name; the CE baseline's names no teacher: one run serves every teacher's row."""
        hyper = {"alpha": self.alpha, "temperature": self.temperature}
        return self.run_dir(run_name(student, method, teacher, hyper), seed)


@dataclass
class Node:
    """One stage run: its command, its folder, the runs it needs, and what its summary.json must say."""

    label: str
    out_dir: Path
    argv: list[str]
    deps: list[Path]
    expect: dict[str, Any]


@dataclass
class Outcome:
    """What a call did; `main` returns it so that tests can inspect a sweep in-process."""

    nodes: list[Node]
    launched: list[Node] = field(default_factory=list)
    failed: list[Node] = field(default_factory=list)
    skipped: list[Node] = field(default_factory=list)
    table: str = ""


# ------------------------------------------------------------------------------------------- the grid


def build_parser() -> cli.Parser:
    presets = "; ".join(f"{name}: {grid['dataset']}, teachers {' '.join(grid['teachers'])}"
                        for name, grid in PRESETS.items())
    p = cli.Parser(description=__doc__.splitlines()[0],
                   epilog=f"Presets: {presets}. Flags override the preset's values; without a preset, the paper's.")
    p.add_argument("--preset", choices=tuple(PRESETS), help="a named grid with its hyper-parameters")
    p.add_argument("--dataset", help="cifar10, cifar100, synthetic or a PATH.npz")
    p.add_argument("--data_dir", help="where CIFAR is read from or downloaded to (default ./data)")
    p.add_argument("--teachers", nargs="+", help=f"teacher models, of {', '.join(MODEL_NAMES)}")
    p.add_argument("--students", nargs="+", help="student models (default res8)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: ce kd dih")
    p.add_argument("--seeds", nargs="+", type=int, help="default: 30 50 67, the paper's")
    p.add_argument("--epochs", type=int, help="epochs of each student run, and of the other stages unless set")
    p.add_argument("--teacher_epochs", type=int, help="epochs of each teacher run (default: --epochs)")
    p.add_argument("--heads_epochs", type=int, help="epochs of each heads run (default: --epochs)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--wd", type=float, help="weight decay")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    p.add_argument("--schedule", nargs="+", help="LR milestones, e.g. 60 120 180")
    p.add_argument("--gamma", type=float, help="LR decay factor at each milestone")
    p.add_argument("--alpha", type=float, help="weight of the distillation term (KD and DIH)")
    p.add_argument("--temperature", type=float, help="softmax temperature (KD and DIH)")
    p.add_argument("--jobs", type=int, default=1, help="stage processes at once per device")
    p.add_argument("--gpus", help="spread the processes over these GPUs, e.g. 0,1 (default: each script's choice)")
    p.add_argument("--runs_dir", default="runs", help="root of the run folders")
    p.add_argument("--results_dir", default="results", help="the table and plots go to <results_dir>/<preset>/")
    p.add_argument("--dry_run", action="store_true", help="print every stage command in dependency order; run none")
    return p


def make_sweep(args: argparse.Namespace) -> Sweep:
    """The preset's values (or the paper's), overridden by the flags given, checked before anything runs."""
    given = {key: value for key, value in vars(args).items() if value is not None}
    values = {**DEFAULTS, **PRESETS.get(args.preset, {}), **given}
    for key in ("teachers", "students", "methods", "seeds"):
        values[key] = list(dict.fromkeys(values[key]))  # a name given twice is one grid line
    values["methods"] = [m for m in METHODS if m in values["methods"]]
    if not values["teachers"]:
        raise UserError("the grid is empty: name a --preset or some --teachers")
    unknown = [m for m in values["teachers"] + values["students"] if m not in MODEL_NAMES]
    if unknown:
        raise UserError(f"unknown model {unknown[0]!r}; choose from: {', '.join(MODEL_NAMES)}")
    dataset_tag(values["dataset"])  # an unknown dataset is a DataError, itself a UserError
    values["schedule"] = parse_schedule([str(m) for m in values["schedule"]])
    for key in ("teacher_epochs", "heads_epochs"):
        values[key] = values["epochs"] if values[key] is None else values[key]
    for key in ("epochs", "teacher_epochs", "heads_epochs", "batch_size"):
        if values[key] < 1:
            raise UserError(f"--{key} must be at least 1, got {values[key]}")
    for key, ok, rule in (("lr", values["lr"] > 0, "positive"), ("gamma", values["gamma"] > 0, "positive"),
                          ("temperature", values["temperature"] > 0, "positive"),
                          ("momentum", values["momentum"] >= 0, "non-negative"),
                          ("wd", values["wd"] >= 0, "non-negative"), ("alpha", 0 <= values["alpha"] <= 1, "in [0, 1]")):
        if not ok:
            raise UserError(f"--{key} must be {rule}, got {values[key]}")
    values["name"] = args.preset or "custom"
    values["runs_dir"], values["results_dir"] = Path(args.runs_dir), Path(args.results_dir)
    return Sweep(**{f.name: values[f.name] for f in fields(Sweep)})


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
        "--schedule", *map(str, sweep.schedule), "--gamma", str(sweep.gamma),
    ]


def hyper_parameters(sweep: Sweep, epochs: int, seed: int) -> dict[str, Any]:
    """The engine's settings as summary.json records them (its `config`), to recognise a finished run."""
    return {"seed": seed, "epochs": epochs, "batch_size": sweep.batch_size, "lr": sweep.lr,
            "momentum": sweep.momentum, "wd": sweep.wd, "nesterov": sweep.nesterov, "schedule": sweep.schedule,
            "gamma": sweep.gamma}


# ---------------------------------------------------------------------------------------- running it


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


def execute(
    nodes: list[Node], dataset: str, jobs: int, gpus: list[str | None], log: Callable[[str], None] = print
) -> Outcome:
    """Run the unfinished nodes, each as soon as its dependencies have finished, `jobs` at once per device.

    A failed node's dependents are skipped; the others go on. Output goes to log.txt and stderr.txt in
    each run's folder; the terminal gets one line per start and finish.
    """
    outcome = Outcome(nodes)
    done = {node.out_dir for node in nodes if is_finished(node, dataset)}
    pending = [node for node in nodes if node.out_dir not in done]
    log(f"{len(nodes)} stage runs, {len(done)} already finished, {len(pending)} to run")
    slots = [gpu for _ in range(jobs) for gpu in gpus]  # round-robin over the GPUs
    free = list(range(len(slots)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if len(slots) > 1 and "OMP_NUM_THREADS" not in env:  # concurrent CPU runs would oversubscribe the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(slots)))
    blocked: set[Path] = set()
    running: dict[int, tuple[Node, subprocess.Popen, int, float]] = {}
    try:
        while pending or running:
            for node in list(pending):
                if any(dep in blocked for dep in node.deps):
                    pending.remove(node)
                    blocked.add(node.out_dir)
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
                summary = read_summary(node.out_dir) if process.returncode == 0 else None
                if summary is not None:
                    done.add(node.out_dir)
                    log(f"done   {node.label}: final test acc {summary['final_test_acc']:.2f}% ({seconds:.0f} s)")
                else:
                    blocked.add(node.out_dir)
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


# ----------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Stat:
    """Accuracies of one table cell over seeds: mean ± sample standard deviation (ddof=1), with n."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def __str__(self) -> str:
        if not self.values:
            return "—"
        spread = f" ± {self.std:.2f}" if self.std is not None else ""
        return f"{self.mean:.2f}{spread} (n={self.n})"


def aggregate(sweep: Sweep) -> list[dict[str, str | Stat]]:
    """One row per teacher -> student; final-epoch accuracy first, best-epoch only in labelled columns."""
    rows = []
    for teacher in sweep.teachers:
        teachers = [read_summary(sweep.teacher_dir(teacher, seed)) for seed in sweep.seeds]
        heads = [read_summary(sweep.heads_dir(teacher, seed)) for seed in sweep.seeds]
        taps = list(dict.fromkeys(h["tap"] for summary in heads if summary for h in summary["heads"]))
        for student in sweep.students:
            row: dict[str, str | Stat] = {"teacher": teacher, "student": student,
                                          "teacher acc": final_accs(teachers)}
            for tap in taps:
                row[f"head {tap}"] = Stat(tuple(h["final_test_acc"] for summary in heads if summary
                                                for h in summary["heads"] if h["tap"] == tap))
            students = {m: [read_summary(sweep.student_dir(student, m, teacher, seed)) for seed in sweep.seeds]
                        for m in sweep.methods}
            for method, summaries in students.items():
                row[method.upper()] = final_accs(summaries)
            for method, summaries in students.items():
                row[f"{method.upper()} best epoch"] = Stat(tuple(s["best_test_acc"] for s in summaries if s))
            rows.append(row)
    return rows


def final_accs(summaries: list[dict[str, Any] | None]) -> Stat:
    return Stat(tuple(s["final_test_acc"] for s in summaries if s))


def columns(rows: list[dict[str, str | Stat]]) -> list[str]:
    """Every column of the table, in first-seen order (teachers differ in their heads)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def to_markdown(sweep: Sweep, rows: list[dict[str, str | Stat]]) -> str:
    header = columns(rows)
    epochs = (f"{sweep.teacher_epochs}/{sweep.heads_epochs}/{sweep.epochs} epochs (teacher/heads/student)"
              if sweep.teacher_epochs != sweep.epochs or sweep.heads_epochs != sweep.epochs
              else f"{sweep.epochs} epochs")
    lines = [
        f"# {sweep.name}: {sweep.dataset}, seeds {' '.join(map(str, sweep.seeds))}, {epochs}",
        "",
        "Test accuracy (%) after the final epoch: mean ± sample std over seeds (n runs). Heads: the teacher's "
        "intermediate classifiers. `best epoch` columns pick the best epoch by test accuracy, which is "
        "optimistic: for reference only.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(row.get(key, Stat(()))) for key in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, str | Stat]]) -> str:
    """Numbers rather than formatted text: `<column> mean`, `<column> std`, `<column> n` for each statistic."""
    header: list[str] = []
    for key in columns(rows):
        header += [key] if isinstance(rows[0].get(key), str) else [f"{key} mean", f"{key} std", f"{key} n"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        cells: list[Any] = []
        for key in columns(rows):
            value = row.get(key, Stat(()))
            cells += [value] if isinstance(value, str) else [value.mean, value.std, value.n]
        writer.writerow(["" if cell is None else cell for cell in cells])
    return buffer.getvalue()


def read_curve(out_dir: Path) -> list[float]:
    """Test accuracy by epoch from a finished run's metrics.jsonl."""
    if read_summary(out_dir) is None:
        return []
    return [json.loads(line)["test_acc"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def plot(sweep: Sweep, rows: list[dict[str, str | Stat]], out: Path) -> None:
    """curves.png: test accuracy by epoch per method (mean over seeds, min–max band), one panel per teacher;
    bars.png: the table as grouped bars with ±std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(sweep.teachers), figsize=(max(6.5, 5.0 * len(sweep.teachers)), 4), squeeze=False)
    for ax, teacher in zip(axes[0], sweep.teachers, strict=True):
        for student in sweep.students:
            for method in sweep.methods:
                runs = [sweep.student_dir(student, method, teacher, seed) for seed in sweep.seeds]
                curves = [curve for run in runs if (curve := read_curve(run))]
                if not curves:
                    continue
                length = min(map(len, curves))
                stacked = np.array([c[:length] for c in curves])
                epochs = np.arange(1, length + 1)
                label = f"{student} {method.upper()} (n={len(curves)})"
                (line,) = ax.plot(epochs, stacked.mean(0), marker=".", label=label)
                ax.fill_between(epochs, stacked.min(0), stacked.max(0), color=line.get_color(), alpha=0.2)
        ax.set(title=f"teacher {teacher}", xlabel="epoch", ylabel="test accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(f"{sweep.name}: students' test accuracy (mean over seeds, min–max band)", fontsize="medium")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    groups = ["teacher acc"] + [m.upper() for m in sweep.methods]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.5 * len(rows) * len(groups)), 4))
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        stats = [row[group] for row in rows]
        ax.bar(np.arange(len(rows)) + i * width, [s.mean if s.n else np.nan for s in stats], width,
               yerr=[s.std or 0.0 for s in stats], capsize=3, label=group.replace(" acc", ""))
    ax.set_xticks(np.arange(len(rows)) + width * (len(groups) - 1) / 2,
                  [f"{row['teacher']} -> {row['student']}" for row in rows])
    ax.set(ylabel="final test accuracy (%)", title=f"{sweep.name}: mean ± std over seeds")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "bars.png", dpi=120)
    plt.close(fig)


def report(sweep: Sweep) -> str:
    """Write results.md, results.csv and the plots from whatever runs exist; return the markdown table."""
    rows = aggregate(sweep)
    out = sweep.results_dir / sweep.name
    table = to_markdown(sweep, rows)
    atomic_write_text(out / "results.md", table)
    atomic_write_text(out / "results.csv", to_csv(rows))
    plot(sweep, rows, out)
    return table


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> Outcome:
    """Run (or, with --dry_run, list) the sweep, then tabulate it; the outcome lets tests look inside."""
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    gpus = parse_gpus(args.gpus)
    sweep = make_sweep(args)
    nodes = build_graph(sweep)
    if args.dry_run:
        print("\n".join(shlex.join(node.argv) for node in nodes))
        return Outcome(nodes)
    with exclusive(sweep.runs_dir / dataset_tag(sweep.dataset)):
        outcome = execute(nodes, sweep.dataset, args.jobs, gpus)
    outcome.table = report(sweep)
    print(f"\n{outcome.table}\nwritten to {sweep.results_dir / sweep.name}: results.md results.csv curves.png bars.png")
    if outcome.failed or outcome.skipped:
        print(f"{len(outcome.failed)} stage run(s) failed and {len(outcome.skipped)} were skipped (see above); "
              f"rerun the same command to retry them", file=sys.stderr)
    return outcome


if __name__ == "__main__":
    cli.main_guard(lambda argv: sys.exit(1 if main(argv).failed else 0), "rerun the same command to continue")
