"""Stage 3's students, from the command line to the engine's runs.

test_dih.py names one or more methods. Each becomes a `Student`: its own arguments, resolved as that method's own
run would hold them (`resolve`: a flag applies to every named method that takes it, `--METHOD.FLAG` to one), its
checkpoints found and read before any data is loaded (`read_inputs`), and its folder. The students are grouped by
the network that teaches them (`groups_of`); each group gets that network's pass built once (`teacher_pass`) and
every student its `engine.Run` on it (`build_run`), so that `engine.fit_group` draws each batch once and runs each
teacher once per batch for all the students it teaches.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import assembly
import cli
import runlock
from data import Dataset
from engine import Run, TrainConfig, fit_group
from methods import HYPERS, METHODS, Method, Setup, TeacherPass, run_name
from methods.base import INPUTS
from models import MODEL_NAMES
from runlock import run_folder
from utils import UserError

DEFAULT_TEACHER = "res110"
# Flags that `--METHOD.FLAG` sets for one method of a group: its hyper-parameters, its inputs, its folder.
PER_METHOD = (*HYPERS, *(flag for flag in INPUTS if flag != "teacher"), "out_dir")
OWN_FLAGS = (*HYPERS, *INPUTS, "out_dir")  # every flag that a student's own run holds (None where it takes none)


def option(flag: str, method: str | None = None) -> str:
    """How the command line spells `flag`: `--FLAG`, or `--METHOD.FLAG` for one method's own value."""
    return f"--{method}.{flag}" if method else f"--{flag}"


def method_flags(values: dict[str, Any], method: str | None = None) -> list[str]:
    """`values` (hyper-parameters, inputs, a folder) as test_dih.py flags, each method's own with `method`; a switch
    is `--FLAG` or `--no-FLAG` (`--METHOD.no-FLAG`)."""
    flags: list[str] = []
    for flag, value in values.items():
        if isinstance(value, bool):
            flags.append(option(flag if value else f"no-{flag}", method))
        else:
            flags += [option(flag, method), str(value)]
    return flags


def add_flags(parser: cli.Parser) -> None:
    """test_dih.py's flags beyond the common ones: the methods, the networks, every hyper-parameter, and each
    per-method spelling (hidden from --help, which explains them once)."""
    parser.add_argument("--method", nargs="+", choices=tuple(METHODS), default=["dih"],
                        help="; ".join(f"{name}: {m.transfers}" for name, m in METHODS.items())
                        + ". Several methods train side by side, sharing each batch and each teacher pass")
    parser.add_argument("--student", default="res8", help=f"one of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--teacher", help=f"the trained teacher's architecture (default: {DEFAULT_TEACHER})")
    parser.add_argument("--teacher_ckpt", help="its weights (default: stage 1's default output)")
    parser.add_argument("--heads_ckpt", help="DIH: stage-2 heads (default: stage 2's default output)")
    parser.add_argument("--ta", help="TAKD: the teacher assistant's architecture (default: res20, or res14 "
                                     "for a res20 teacher)")
    parser.add_argument("--ta_ckpt", help="TAKD: its weights (default: the KD student of the teacher in its "
                                          "default folder)")
    group = parser.add_argument_group("hyper-parameters (each method's defaults apply where not given: "
                                      "see README, Methods)")
    for name, hyper in HYPERS.items():
        defaults = ", ".join(f"{m.name} {m.defaults[name]}" for m in METHODS.values() if name in m.defaults)
        text = f"{hyper.help} (default: {defaults or 'set by the method'})"
        if hyper.type is bool:
            group.add_argument(option(name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(option(name), type=cli.finite_float if hyper.type is float else hyper.type,
                               default=None, help=text)
    one = parser.add_argument_group(
        "one method's value, with several methods: --METHOD.FLAG",
        "A flag above applies to every named method that takes it; --kd.alpha 0.5 gives KD its own value, "
        f"--kd.out_dir its own folder (--out_dir names one folder). FLAG: {', '.join(PER_METHOD)}; "
        "--METHOD.no-FLAG for a switch.")
    for method in METHODS:
        for name in PER_METHOD:
            dest, hidden = f"{method}.{name}", {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
            if name in HYPERS and HYPERS[name].type is bool:
                one.add_argument(option(name, method), dest=dest, action="store_const", const=True, **hidden)
                one.add_argument(option(f"no-{name}", method), dest=dest, action="store_const", const=False, **hidden)
            else:
                kind = HYPERS[name].type if name in HYPERS else str
                one.add_argument(option(name, method), dest=dest, type=cli.finite_float if kind is float else kind,
                                 **hidden)


def own_values(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The --METHOD.FLAG values by method, taken out of `args`; each names a method of --method that takes FLAG."""
    values: dict[str, dict[str, Any]] = {}
    for key in [key for key in vars(args) if "." in key]:
        name, flag = key.split(".", 1)
        value = vars(args).pop(key)
        if name not in args.method:
            raise UserError(f"--{key}: {name} is not among --method {' '.join(args.method)}")
        if flag != "out_dir" and flag not in METHODS[name].accepts:
            takes = ", ".join(option(k, name) for k in METHODS[name].accepts if k in PER_METHOD)
            raise UserError(f"--{key} makes no sense: {name} takes {takes or 'only ' + option('out_dir', name)}")
        values.setdefault(name, {})[flag] = value
    return values


def resolve(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One namespace per named method, as that method's own run would hold it: its hyper-parameters (given or
    default, checked) and inputs, None for every flag it does not take. Recorded with the run and compared on
    --resume, so a grouped student and its solo run record the same arguments.

    A flag that no named method takes is refused rather than silently ignored, as is one overridden by
    --METHOD.FLAG for every method that takes it.
    """
    names = args.method
    twice = [name for name, count in Counter(names).items() if count > 1]
    if twice:
        raise UserError(f"--method names {twice[0]} twice")
    methods = [METHODS[name] for name in names]
    own = own_values(args)
    for flag in OWN_FLAGS:
        if getattr(args, flag) is None:
            continue
        takers = [m.name for m in methods if flag == "out_dir" or flag in m.accepts]
        if not takers:
            if len(methods) == 1:
                takes = ", ".join(option(k) for k in methods[0].accepts) or "none of these flags"
                raise UserError(f"--{flag} makes no sense with --method {names[0]} (it takes {takes})")
            raise UserError(f"--{flag} makes no sense with --method {' '.join(names)}: none of them takes it")
        if all(flag in own.get(name, {}) for name in takers):
            raise UserError(f"--{flag} applies to no method: {', '.join(option(flag, n) for n in takers)} "
                            "override it")
    if args.out_dir is not None and len(names) > 1:
        raise UserError(f"--out_dir names one folder for {len(names)} students: give each its own with "
                        f"--METHOD.out_dir (e.g. {option('out_dir', names[0])}), or leave it out for the default "
                        "folders")
    return [own_run(args, method, own.get(method.name, {})) for method in methods]


def own_run(args: argparse.Namespace, method: Method, given: dict[str, Any]) -> argparse.Namespace:
    """`method`'s own arguments: the shared flags it takes, its --METHOD.FLAG values over them, its defaults."""
    run = argparse.Namespace(**vars(args))
    run.method = method.name
    for flag in OWN_FLAGS:
        takes = flag == "out_dir" or flag in method.accepts
        setattr(run, flag, given.get(flag, getattr(args, flag)) if takes else None)
    for name, default in method.defaults.items():
        value = default if getattr(run, name) is None else getattr(run, name)
        if not HYPERS[name].valid(value):
            raise UserError(f"{option(name, method.name if name in given else None)} must be {HYPERS[name].rule}, "
                            f"got {value}")
        setattr(run, name, value)
    if method.teacher != "none" and run.teacher is None:
        run.teacher = DEFAULT_TEACHER
    return run


@dataclass
class Student:
    """One student of the command: its method, its own arguments, its folder, the checkpoints it reads."""

    method: Method
    args: argparse.Namespace
    hyper: dict[str, Any]
    out_dir: Path
    teacher_ckpt: dict[str, Any] | None
    heads_ckpt: dict[str, Any] | None
    assistant: dict[str, Any] | None  # TAKD: the assistant's checkpoint, which teaches it

    @property
    def provenance(self) -> dict[str, dict[str, str]]:
        """File and fingerprint of each network the student learns from: --resume refuses a run whose inputs
        changed on disk."""
        inputs = {"teacher": self.teacher_ckpt, "heads": self.heads_ckpt, "assistant": self.assistant}
        return {role: {"file": ckpt["path"], "fingerprint": ckpt["fingerprint"]}
                for role, ckpt in inputs.items() if ckpt is not None}

    @property
    def teaching(self) -> dict[str, Any] | None:
        """The checkpoint of the network that teaches it; students taught by the same file share its pass."""
        return self.assistant or self.teacher_ckpt


def hyper_parameters(run: argparse.Namespace) -> dict[str, Any]:
    """The values of the hyper-parameters that `run`'s method takes."""
    return {name: getattr(run, name) for name in METHODS[run.method].defaults}


def folder_of(run: argparse.Namespace) -> Path:
    """The student's run folder: its --out_dir, or the default one its method, networks and values name."""
    return cli.run_dir(run, run_name(run.student, run.method, run.teacher, hyper_parameters(run), run.ta))


def read_inputs(run: argparse.Namespace) -> Student:
    """A student's checkpoints, found and read (before any data is loaded), and its folder."""
    method = METHODS[run.method]
    teacher_ckpt = heads_ckpt = assistant = None
    if method.teacher != "none":
        teacher_ckpt = assembly.read_teacher(run, run.teacher, None if method.teacher == "plain" else method.teacher)
    if method.heads:
        heads_ckpt = assembly.read_heads(run)
    if method.assistant:
        from methods.takd import read_assistant

        assistant = read_assistant(run, teacher_ckpt)
        run.ta = assistant["model"]
    return Student(method, run, hyper_parameters(run), folder_of(run), teacher_ckpt, heads_ckpt, assistant)


def groups_of(students: list[Student]) -> list[list[Student]]:
    """The students by the checkpoint that teaches them (one group per file, in order); each without a teacher
    (CE) alone."""
    groups: dict[Any, list[Student]] = {}
    for i, student in enumerate(students):
        teaching = student.teaching
        key = ("none", i) if teaching is None else Path(teaching["path"]).resolve()
        groups.setdefault(key, []).append(student)
    return list(groups.values())


def describe(group: list[Student]) -> str:
    """One line of the groups a command formed: the methods, and the network that teaches them."""
    names = " ".join(student.method.name for student in group)
    first = group[0]
    if first.teaching is None:
        return f"{names}: no teacher"
    role = f"assistant {first.args.ta}" if first.assistant else f"teacher {first.args.teacher}"
    return f"{names} <- {role} ({first.teaching['path']})"


def teacher_pass(group: list[Student], data: Dataset, device: torch.device,
                 cfg: TrainConfig) -> TeacherPass | None:
    """The frozen network that teaches the group, with DIH's heads where a member reads them: built once."""
    first = group[0]
    if first.teaching is None:
        return None
    name = first.args.ta if first.assistant else first.args.teacher
    teacher, identity = assembly.build_teacher(first.teaching, name, data, device, cfg)
    heads = next((assembly.build_heads(s.heads_ckpt, identity, device) for s in group if s.heads_ckpt is not None),
                 None)
    return TeacherPass(teacher, heads)


def build_run(student: Student, shared: TeacherPass | None, data: Dataset, device: torch.device,
              cfg: TrainConfig, name: str) -> Run:
    """The student's stage on the group's teacher pass, its weights drawn from --seed exactly as alone."""
    run, method = student.args, student.method
    meta: dict[str, Any] = {"model": run.student, "method": method.name, "teacher": run.teacher,
                            "alpha": 0.0 if method.teacher == "none" else None, "temperature": None, **student.hyper}
    if student.assistant is not None:  # TAKD: the assistant teaches (read_assistant checked its descent)
        meta |= {"teacher_fingerprint": student.teacher_ckpt["fingerprint"], "ta": run.ta,
                 "ta_fingerprint": student.assistant["fingerprint"], "ta_ckpt": student.assistant["path"]}
    elif student.teacher_ckpt is not None:
        meta["teacher_fingerprint"] = student.teacher_ckpt["fingerprint"]
        if student.heads_ckpt is not None:
            meta["heads_fingerprint"] = student.heads_ckpt["fingerprint"]
    torch.manual_seed(run.seed)
    model = assembly.build(run.student, data.num_classes, device, cfg.channels_last, data.image_size)
    setup = Setup(student=model, teacher=shared.teacher if shared else None, hyper=student.hyper, data=data, meta=meta,
                  heads=shared.heads if shared else None, teacher_ckpt=student.teacher_ckpt, teacher_pass=shared,
                  provenance=student.provenance, batch_size=cfg.batch_size)
    stage = method.build(setup)
    stage.extras.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    print(f"stage 3: {run.student} by {method.name}" + (f" from {run.teacher}" if run.teacher else "")
          + f" on {device} -> {student.out_dir}")
    return Run(stage, cfg, device, student.out_dir, cli.stored_args(run), name)


def group_layout(cfg: TrainConfig, students: list[Student], resume: bool) -> TrainConfig:
    """`cfg` with the memory layout the students' runs started with, on --resume (assembly.keep_layout); students
    started in different layouts cannot train side by side."""
    layouts = {student.out_dir: assembly.keep_layout(cfg, student.out_dir, resume) for student in students}
    if len({c.channels_last for c in layouts.values()}) > 1:
        apart = ", ".join(f"{folder} channels_last={c.channels_last}" for folder, c in layouts.items())
        raise UserError(f"--resume: these runs started in different memory layouts ({apart}); resume each with "
                        "--method alone")
    return next(iter(layouts.values()))


def heads_not_trained(run: argparse.Namespace) -> bool:
    """Whether `run`'s method reads DIH's heads and no heads checkpoint is there (yet): its heads run is still
    training, has failed, or never ran."""
    return METHODS[run.method].heads and not assembly.heads_path(run).exists()


def wait_for_heads(run: argparse.Namespace) -> Student | None:
    """The student, once its heads run has ended (waiting for a process that still works in the heads' folder);
    None, with one line saying why, if that run left no heads checkpoint."""
    path = assembly.heads_path(run)
    folder = path.parent
    if not path.exists() and folder.is_dir():
        def waiting(holder: str) -> None:
            print(f"{run.method} waits for the heads run in {folder} ({holder}) to end")

        with contextlib.suppress(runlock.Unwritable), runlock.hold(folder / runlock.RUN_LOCK, wait=waiting):
            pass
    if not path.exists():
        print(f"{run.method} student {run.student}: not trained: its heads {path} are missing (their run failed or "
              "has not run); the other students trained")
        return None
    return read_inputs(run)


def train(args: argparse.Namespace, device: torch.device, cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Train the students of --method, each into its own folder; return their summaries by method, in order.

    With several methods, a student whose DIH heads are not trained (yet) holds back no other: the others train
    first; it trains after them, alone (its numbers are the same), if its heads run ends with heads, and is
    otherwise reported as not trained: the command then fails, naming it, once the others are done.
    """
    resolved = resolve(args)
    later = [run for run in resolved if len(resolved) > 1 and heads_not_trained(run)]
    # Every checkpoint this run needs is found and read before the dataset is loaded (or downloaded).
    students = [read_inputs(run) for run in resolved if run not in later]
    late_folders = [folder_of(run) for run in later]
    folders = Counter(folder.resolve() for folder in [*(student.out_dir for student in students), *late_folders])
    if max(folders.values()) > 1:
        raise UserError(f"two students would write into {next(f for f, n in folders.items() if n > 1)}: give each "
                        "its own --METHOD.out_dir")
    groups = groups_of(students)
    if len(resolved) > 1:
        print(f"{len(resolved)} students in {len(groups)} group(s); each batch is drawn once for all, each teacher "
              "runs once per batch for its group:\n" + "\n".join(f"  {describe(group)}" for group in groups))
    for run in later:
        print(f"  {run.method}: its heads {assembly.heads_path(run)} are not trained yet; it trains after the others")
    with contextlib.ExitStack() as held:  # one writer per run folder, from before the data is loaded to the end
        for folder in [*(student.out_dir for student in students), *late_folders]:
            held.enter_context(run_folder(folder))
        cfg = group_layout(cfg, students, args.resume) if students else cfg
        data = cli.load_data(args, device)
        summaries = fit_groups(groups, data, device, cfg, args.resume, named=len(resolved) > 1) if groups else {}
        untrained = []
        for run in later:
            student = wait_for_heads(run)
            if student is None:
                untrained.append(run.method)
                continue
            late_cfg = group_layout(cfg, [student], args.resume)
            summaries |= fit_groups([[student]], data, device, late_cfg, args.resume, named=True)
    if untrained:
        done = ", ".join(summaries) or "none"
        raise UserError(f"{' '.join(untrained)} not trained: its heads are missing (their run failed or has not run); "
                        f"trained: {done}")
    return {run.method: summaries[run.method] for run in resolved}


def fit_groups(groups: list[list[Student]], data: Dataset, device: torch.device, cfg: TrainConfig,
               resume: bool, named: bool) -> dict[str, dict[str, Any]]:
    """Train the groups side by side (each group's teacher pass built once); the summaries by method. `named`: the
    log lines name their student."""
    runs, order = [], []
    for group in groups:
        shared = teacher_pass(group, data, device, cfg)
        for student in group:
            runs.append(build_run(student, shared, data, device, cfg, student.method.name if named else ""))
            order.append(student)
    return dict(zip((s.method.name for s in order), fit_group(runs, data, resume=resume), strict=True))
