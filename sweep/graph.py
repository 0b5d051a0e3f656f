"""The sweep as a dependency graph: one `Node` per stage run, what finished means, and the graph's levels."""

from __future__ import annotations

import functools
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data import BUILTIN, IMAGENET, dataset_tag, is_streamed, npz_name
from methods import METHODS as REGISTRY
from students import method_flags
from utils import UserError

from .grid import Sweep, schedule_tokens

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Node:
    """One process of the sweep: a stage run, or a group of students trained side by side (test_dih.py with several
    methods); its command, its folder, the runs it needs, and what each run's summary.json must say.

    `out_dir` holds its log.txt and stderr.txt and names its Slurm job: the run's own folder, or for a group a
    folder of its own. The runners read nothing else, so a new kind of run (an assistant teacher, a variant
    teacher) is one more `add` in `build_graph`.
    """

    label: str
    out_dir: Path
    argv: list[str]
    deps: list[Path]  # the run folders it needs
    runs: dict[Path, dict[str, Any]]  # each run folder it writes -> what that run's summary.json must say
    # Run folders it comes after, whether they succeed or fail: a group's DIH heads, which its other students do not
    # need (test_dih.py trains them, and DIH once its heads are there, or says why it could not).
    after: list[Path] = field(default_factory=list)


@dataclass
class Outcome:
    """What a call did; `reproduce.main` returns it so that tests can inspect a sweep in-process.

    `launched` holds the nodes started here or, with --slurm, submitted; `jobs` maps each unfinished node's
    folder to its Slurm job (submitted now or already queued) and `report_job` is the job that writes the table.
    """

    nodes: list[Node]
    launched: list[Node] = field(default_factory=list)
    failed: list[Node] = field(default_factory=list)
    skipped: list[Node] = field(default_factory=list)
    table: str = ""
    jobs: dict[Path, str] = field(default_factory=dict)
    report_job: str | None = None


@dataclass(frozen=True)
class Member:
    """A student run that may join its teacher's group: the group it belongs to, its method and hyper-parameters."""

    key: tuple[str, str, int, int, float]  # (student, teacher, seed, batch_size, lr): one stream of batches, one lr
    method: str
    hyper: dict[str, Any]
    heads: Path | None  # DIH's heads checkpoint


def build_graph(sweep: Sweep, group: bool = True) -> list[Node]:
    """Every stage run of the sweep, once each, in dependency order; with `group`, the students that one teacher
    run teaches (same student model, seed, batch size and lr) as one node.

    Teachers first (plain, or imported from --import_teachers; and TOFD's variant where the sweep has TOFD), then
    what is trained on a teacher and shared by students (DIH's heads, TAKD's assistant), then every student. What a
    student method needs is read from its `Method` record, so a new method needs no change here.
    """
    nodes: dict[Path, Node] = {}
    members: dict[Path, Member] = {}
    methods = [REGISTRY[m] for m in sweep.methods]

    def add(label: str, script: str, out_dir: Path, epochs: int | None, seed: int, flags: list[str],
            deps: list[Path], expect: dict[str, Any], recipe: dict[str, Any] | None = None) -> None:
        """A run of `script`; `epochs=None`: an import, which takes no training flags and records no recipe."""
        common = stage_flags(sweep, epochs, seed, recipe) if epochs else data_flags(sweep, seed)
        argv = [sys.executable, str(ROOT / script), *flags, *common, "--out_dir", str(out_dir), "--resume"]
        expect = {**expect, **(hyper_parameters(sweep, epochs, seed, recipe) if epochs else {"seed": seed})}
        nodes.setdefault(out_dir, Node(label, out_dir, argv, deps, {out_dir: expect}))

    def add_student(student: str, method: str, teacher: str, seed: int, extra: list[str], deps: list[Path],
                    expect: dict[str, Any]) -> Path:
        hyper = sweep.hyper(method, teacher, student)
        name = f"{method} student {student}" + (f" <- {teacher}" if REGISTRY[method].teacher != "none" else "")
        out_dir = sweep.student_dir(student, method, teacher, seed)
        add(f"{name} seed {seed}", "test_dih.py", out_dir, sweep.epochs, seed,
            ["--student", student, "--method", method, *extra, *method_flags(hyper)], deps,
            {"stage": "student", "model": student, "method": method, **hyper, **expect},
            sweep.recipe_of(student, method))
        return out_dir

    variants = ["plain"] + (["tofd"] if any(m.teacher == "tofd" for m in methods) else [])
    for variant in variants:
        for teacher in sweep.teachers:
            for seed in sweep.seeds:
                tofd = variant == "tofd"
                source = None if tofd else sweep.import_file(teacher)
                if source is not None:  # a TOFD teacher is always trained: its classifiers are part of it
                    add(f"teacher {teacher} seed {seed} (imported)", "train_teacher.py",
                        sweep.teacher_dir(teacher, seed), None, seed, ["--model", teacher, "--import", str(source)],
                        [], {"stage": "teacher", "model": teacher, "imported_file": str(source)})
                    continue
                add(f"{'TOFD ' if tofd else ''}teacher {teacher} seed {seed}", "train_teacher.py",
                    sweep.teacher_dir(teacher, seed, variant), sweep.teacher_epochs, seed,
                    ["--model", teacher, *(["--tofd"] if tofd else [])], [],
                    {"stage": "teacher", "model": teacher, **({"variant": variant} if tofd else {})})
    for teacher in sweep.teachers:
        for seed in sweep.seeds:
            teacher_dir = sweep.teacher_dir(teacher, seed)
            uses_teacher = ["--teacher", teacher, "--teacher_ckpt", str(teacher_dir / "teacher.pt")]
            if any(m.heads for m in methods):
                add(f"heads {teacher} seed {seed}", "train_heads.py", sweep.heads_dir(teacher, seed),
                    sweep.heads_epochs, seed, uses_teacher, [teacher_dir], {"stage": "heads", "model": teacher})
            ta = sweep.assistant(teacher)
            if any(m.assistant for m in methods) and ta is not None:
                add_student(ta, "kd", teacher, seed, uses_teacher, [teacher_dir], {"teacher": teacher})
    for student in sweep.students:
        for method in methods:
            for teacher in sweep.teachers_of(student):  # a CE student's folder names no teacher: `add` keeps one node
                for seed in sweep.seeds:
                    if method.teacher == "none":
                        add_student(student, method.name, teacher, seed, [], [], {"teacher": None})
                        continue
                    teacher_dir = sweep.teacher_dir(teacher, seed, method.teacher)
                    deps = [teacher_dir]
                    extra = ["--teacher", teacher, "--teacher_ckpt", str(teacher_dir / "teacher.pt")]
                    expect: dict[str, Any] = {"teacher": teacher}
                    if method.heads:
                        deps.append(sweep.heads_dir(teacher, seed))
                        extra += ["--heads_ckpt", str(deps[-1] / "heads.pt")]
                    if method.assistant:
                        ta = sweep.assistant(teacher)
                        if ta is None:
                            continue  # no assistant defined for so small a teacher: no TAKD row
                        deps.append(sweep.student_dir(ta, "kd", teacher, seed))
                        extra += ["--ta", ta, "--ta_ckpt", str(deps[-1] / "student.pt")]
                        expect["ta"] = ta
                    out_dir = add_student(student, method.name, teacher, seed, extra, deps, expect)
                    if method.teacher == "plain" and not method.assistant:  # taught by the teacher run itself
                        heads = sweep.heads_dir(teacher, seed) / "heads.pt" if method.heads else None
                        recipe = sweep.recipe_of(student, method.name)
                        members.setdefault(out_dir, Member((student, teacher, seed, recipe["batch_size"], recipe["lr"]),
                                                           method.name,
                                                           sweep.hyper(method.name, teacher, student), heads))
    graph = list(nodes.values())
    return group_students(sweep, graph, members) if group else graph


def group_students(sweep: Sweep, graph: list[Node], members: dict[Path, Member]) -> list[Node]:
    """The graph with the students of each (student model, teacher run, seed, batch size, lr) merged into one node,
    in the place of the first of them (its dependencies are theirs: still after them in build order). Students of
    different batch sizes cannot share batches, nor one process's --lr: they are separate groups."""
    by_key: dict[tuple[str, str, int, int, float], list[Node]] = {}
    for node in graph:
        if node.out_dir in members:
            by_key.setdefault(members[node.out_dir].key, []).append(node)
    merged = {nodes[0].out_dir: group_node(sweep, key, nodes, members) for key, nodes in by_key.items()
              if len(nodes) > 1}
    absorbed = {node.out_dir for nodes in by_key.values() if len(nodes) > 1 for node in nodes[1:]}
    return [merged.get(node.out_dir, node) for node in graph if node.out_dir not in absorbed]


def group_node(sweep: Sweep, key: tuple[str, str, int, int, float], nodes: list[Node],
               members: dict[Path, Member]) -> Node:
    """One test_dih.py process for several students of one teacher run: each method's values and folder spelled
    --METHOD.FLAG, so that every student gets the arguments, folder and numbers of its own node. It comes after DIH's
    heads run without needing it: a failed heads run holds back DIH alone, which test_dih.py reports as not trained
    while the other students train."""
    student, teacher, seed, batch_size, lr = key
    recipe = {"batch_size": batch_size, "lr": lr}
    # A group of the sweep's own recipe keeps the plain folder name; one of a method's own recipe says which.
    own_recipe = "" if recipe == sweep.recipe_of(student) else f"-b{batch_size}-lr{lr:g}"
    own = [members[node.out_dir] for node in nodes]
    methods = [member.method for member in own]
    heads = next((member.heads for member in own if member.heads is not None), None)
    argv = [sys.executable, str(ROOT / "test_dih.py"), "--student", student, "--method", *methods,
            "--teacher", teacher, "--teacher_ckpt", str(sweep.teacher_dir(teacher, seed) / "teacher.pt"),
            *(["--heads_ckpt", str(heads)] if heads else []),
            *(flag for member in own for flag in method_flags(member.hyper, member.method)),
            *stage_flags(sweep, sweep.epochs, seed, recipe),
            *(flag for node, member in zip(nodes, own, strict=True)
              for flag in method_flags({"out_dir": str(node.out_dir)}, member.method)),
            "--resume"]
    heads_runs = {member.heads.parent for member in own if member.heads is not None}
    needed = list(dict.fromkeys(dep for node in nodes for dep in node.deps))
    runs = {run: expect for node in nodes for run, expect in node.runs.items()}
    return Node(f"{' '.join(methods)} students {student} <- {teacher} seed {seed}",
                sweep.run_dir(f"group-{student}-{teacher}{own_recipe}", seed), argv,
                [dep for dep in needed if dep not in heads_runs], runs, [dep for dep in needed if dep in heads_runs])


def data_flags(sweep: Sweep, seed: int) -> list[str]:
    """The data and the seed: all an imported teacher's run takes."""
    return ["--dataset", sweep.dataset, "--data_dir", sweep.data_dir, "--seed", str(seed),
            *(["--data_url", sweep.data_url] if sweep.data_url else [])]


def stage_flags(sweep: Sweep, epochs: int, seed: int, recipe: dict[str, Any] | None = None) -> list[str]:
    """The flags every stage script takes, spelled out so that each command stands on its own (`recipe`: a student's
    own batch_size and lr, `Sweep.recipe_of`, in the place of the sweep's)."""
    recipe = recipe or {"batch_size": sweep.batch_size, "lr": sweep.lr}
    return [
        *data_flags(sweep, seed), "--epochs", str(epochs),
        "--batch_size", str(recipe["batch_size"]), "--lr", str(recipe["lr"]),
        "--momentum", str(sweep.momentum),
        "--wd", str(sweep.wd), "--nesterov" if sweep.nesterov else "--no-nesterov",
        "--schedule", *schedule_tokens(sweep.schedule), "--gamma", str(sweep.gamma),
    ]


def hyper_parameters(sweep: Sweep, epochs: int, seed: int, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine's settings as summary.json records them (its `config`), to recognise a finished run."""
    recipe = recipe or {"batch_size": sweep.batch_size, "lr": sweep.lr}
    return {"seed": seed, "epochs": epochs, "batch_size": recipe["batch_size"], "lr": recipe["lr"],
            "momentum": sweep.momentum, "wd": sweep.wd, "nesterov": sweep.nesterov, "schedule": sweep.schedule,
            "gamma": sweep.gamma}


def levels(nodes: list[Node]) -> list[list[Node]]:
    """The nodes by depth, in build order within each: a node's level is one past the deepest node it needs."""
    depth: dict[Path, int] = {}  # by run folder
    for node in nodes:  # build_graph lists every node after the nodes it needs
        level = 1 + max((depth[dep] for dep in [*node.deps, *node.after]), default=-1)
        depth |= dict.fromkeys(node.runs, level)
    by_node = [depth[next(iter(node.runs))] for node in nodes]
    return [[node for node, d in zip(nodes, by_node, strict=True) if d == level] for level in range(max(by_node) + 1)]


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
        lines.append(f"# level {number} of {len(graph)}: {len(level)} commands {needs}")
        for node in level:
            waits = [*node.deps, *node.after]
            after = f"  # after {' '.join(dep.name for dep in waits)}" if waits else ""
            lines.append(shlex.join(node.argv) + after)
    return "\n".join(lines)


def read_summary(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "summary.json"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} cannot be read ({err}); delete it to rerun that stage") from None


def finished_runs(nodes: list[Node], dataset: str) -> set[Path]:
    """The run folders of `nodes` that hold their finished run."""
    return {out_dir for node in nodes for out_dir, expect in node.runs.items()
            if run_is_finished(out_dir, expect, dataset)}


def is_finished(node: Node, dataset: str) -> bool:
    """Whether every run of the node is finished."""
    return all(run_is_finished(out_dir, expect, dataset) for out_dir, expect in node.runs.items())


def run_is_finished(out_dir: Path, expect: dict[str, Any], dataset: str) -> bool:
    """Whether the folder holds its finished run; a different run there is refused, never reused."""
    summary = read_summary(out_dir)
    if summary is None:
        return False
    recorded = {**summary.get("config", {}), **summary}
    wrong = [key for key, want in expect.items() if recorded.get(key) != want]
    if not dataset_matches(recorded.get("dataset", ""), dataset):
        wrong.insert(0, "dataset")
    if wrong:
        key = wrong[0]
        want = dataset if key == "dataset" else expect[key]
        raise UserError(f"{out_dir} holds another run ({key}={recorded.get(key)!r}, this sweep asks for "
                        f"{want!r}): delete it or choose another --runs_dir")
    return True


def dataset_matches(recorded: str, dataset: str) -> bool:
    """A user's npz is recorded as `npz:<stem>:<hash of its content>` (data.npz_name), so a run on an earlier
    file of the same name is not taken for one on this file; the built-in datasets by their name. ImageNet and folders
    of images (`imagenet:<hash>`, `folder:<tag>:<hash>`, the hash over every file's name and size) by their name alone:
    hashing 1.28 million files to look at a summary would cost minutes, and every stage checks the hash of the data
    against the teacher's and heads' it reads."""
    if dataset in BUILTIN:
        return recorded == dataset
    if is_streamed(dataset):
        return recorded.startswith("imagenet:" if dataset == IMAGENET else f"folder:{dataset_tag(dataset)}:")
    return recorded == dataset_name(Path(dataset).expanduser())


def dataset_name(path: Path) -> str:
    """The npz's recorded name, hashed once per version of the file (a sweep asks for each of its runs)."""
    try:
        stat = path.stat()
    except OSError:
        raise UserError(f"--dataset {path}: no such file, so the sweep's runs cannot be checked against it; pass "
                        "the npz they were trained on") from None
    return _hashed_name(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _hashed_name(path: Path, size: int, mtime_ns: int) -> str:
    return npz_name(path)  # size and mtime are part of the cache's key: a rewritten file is hashed again
