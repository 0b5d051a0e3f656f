"""What a preset's sweep costs on this device, with and without grouping (bench.py --project): every node of the
graph `build_graph` makes of the preset, priced at training steps timed here.

A node is priced from what its runs' summary.json must say (stage, model, method, teacher, epochs), so the
projection follows the graph: a run the sweep does not run is not priced, and CE's one run per seed is priced once.
A run costs its epochs (FitNets: plus its hint epochs) x ceil(50,000 / batch) steps x its step; a group node
costs the group's step for the epochs its students share, each student's own step for the rest. Projected, not
measured: the epochs' evaluation is left out, and FitNets' hint epochs are priced at its KD step (they cost less).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

import cli
from benchmarks.harness import EPOCH_IMAGES, Plan, Timed, describe, print_table, seconds_per_step
from benchmarks.measures import Workload, cifar_sized, group_costs, in_last_phase, method_stage, runs_step, tofd_teacher
from engine import TrainConfig
from utils import UserError

from .graph import Node, build_graph
from .grid import Sweep, add_grid_flags, make_sweep

PROJECTED = "paper-cifar100"  # the preset bench.py --project prices unless --preset names another

Key = tuple[str, ...]  # what one step is timed for: ("teacher", model), ("heads", model), ("student", model, ...)


def preset_sweep(teachers: list[str], preset: str = PROJECTED) -> Sweep:
    """The preset, as reproduce.py builds it, for these of its teachers (none: all of them), with its rows of theirs.
    Its teachers are priced as trained here, not imported."""
    p = cli.Parser()
    add_grid_flags(p)
    sweep = make_sweep(p.parse_args(["--preset", preset]))
    if not teachers:
        return sweep
    unknown = [teacher for teacher in teachers if teacher not in sweep.teachers]
    if unknown:
        raise UserError(f"--project: {', '.join(unknown)} teaches no row of --preset {preset} (its teachers: "
                        f"{', '.join(sweep.teachers)})")
    return dataclasses.replace(sweep, pairs=[(t, s) for t, s in sweep.pairs if t in teachers])


def step_key(expect: dict[str, Any]) -> Key:
    """The step a run trains with, from what its summary.json must say."""
    if expect["stage"] == "teacher":
        return ("TOFD teacher" if expect.get("variant") == "tofd" else "teacher", expect["model"])
    if expect["stage"] == "heads":
        return ("heads", expect["model"])
    return ("student", expect["model"], expect["method"], expect["teacher"] or "")  # CE: no teacher


def run_epochs(expect: dict[str, Any]) -> int:
    """Training epochs of a run: an imported teacher trains none; FitNets' hint phase comes before its epochs."""
    return expect.get("epochs", 0) + expect.get("hint_epochs", 0)


def group_key(node: Node) -> Key:
    first = next(iter(node.runs.values()))
    return (first["teacher"], first["model"], *(expect["method"] for expect in node.runs.values()))


def owner(node: Node) -> str:
    """The teacher whose row of the table a node's cost goes to ("" for CE, which serves every row)."""
    expect = next(iter(node.runs.values()))
    return expect["model"] if expect["stage"] != "student" else expect["teacher"] or ""


def node_seconds(node: Node, step_s: dict[Key, float], group_s: dict[Key, float]) -> float:
    """Seconds per step of an epoch, summed over the node's epochs (multiply by the steps of an epoch)."""
    expects = list(node.runs.values())
    if len(expects) == 1:
        return run_epochs(expects[0]) * step_s[step_key(expects[0])]
    shared = min(expect["epochs"] for expect in expects)
    return shared * group_s[group_key(node)] + sum((run_epochs(expect) - shared) * step_s[step_key(expect)]
                                                  for expect in expects)


def projection(teachers: list[str], num_classes: int, cfg: TrainConfig, device: torch.device, plan: Plan,
               preset: str = PROJECTED) -> dict[str, Any]:
    """Both graphs of the preset (grouped, as reproduce.py runs it, and one process per student), every step they
    need timed here (each teacher's in turns; a group against its students alone), and each graph priced."""
    sweep = preset_sweep(teachers, preset)
    taught = {teacher: [s for t, s in sweep.pairs if t == teacher] for teacher in sweep.teachers}
    separate, grouped = build_graph(sweep, group=False), build_graph(sweep, group=True)
    workloads: dict[tuple[str, str], Workload] = {}

    def workload(teacher: str, student: str) -> Workload:
        if (teacher, student) not in workloads:
            workloads[teacher, student] = Workload.build(teacher, student, num_classes, cfg, device, plan)
        return workloads[teacher, student]

    step_s: dict[Key, float] = {}
    group_s: dict[Key, float] = {}
    groups: dict[str, list[dict[str, Any]]] = {teacher: [] for teacher in sweep.teachers}
    for node in grouped:
        if len(node.runs) > 1 and group_key(node) not in group_s:
            teacher, student, *methods = group_key(node)
            result = group_costs(workload(teacher, student), methods)
            group_s[group_key(node)] = result["group_ms_per_step"] / 1e3
            step_s |= {("student", student, row["method"], teacher): row["alone_ms_per_step"] / 1e3
                       for row in result["students"]}
            groups[teacher].append(result)

    def timed(key: Key) -> Timed:
        if key[0] != "student":  # a teacher's own run: its training, TOFD's, or its heads'
            work = workload(key[1], sweep.students[0])
            return tofd_teacher(work) if key[0] == "TOFD teacher" else work.fast_timed(key[0])
        _, student, method, teacher = key
        work = workload(teacher or sweep.teachers[0], student)  # CE's step is the same whoever's row it serves
        return runs_step([in_last_phase(method_stage(method, work, cifar_sized(work), cfg), cfg, device)], work)

    needed = [key for key in dict.fromkeys(step_key(e) for node in separate for e in node.runs.values())
              if key not in step_s]
    for teacher in ["", *sweep.teachers]:
        keys = [key for key in needed if (key[3] if key[0] == "student" else key[1]) == teacher]
        if keys:  # one teacher's steps take turns
            step_s |= dict(zip(keys, seconds_per_step([timed(key) for key in keys], plan, device), strict=True))

    steps = math.ceil(EPOCH_IMAGES / cfg.batch_size)

    def hours(nodes: list[Node], teacher: str) -> float:
        return sum(node_seconds(node, step_s, group_s) for node in nodes if owner(node) == teacher) * steps / 3600

    def label(key: Key) -> str:
        if key[0] != "student":
            return key[0]
        _, student, method, teacher = key
        if student not in taught[teacher]:
            return "assistant"  # TAKD's assistant: KD into a bigger student
        return method if len(taught[teacher]) == 1 else f"{method} {student}"

    rows = [{"teacher": teacher,
             "steps_ms": {label(key): round(1e3 * step_s[key], 1) for key in needed
                          if (key[3] if key[0] == "student" else key[1]) == teacher},
             "groups": groups[teacher],
             "hours_without_grouping": round(hours(separate, teacher), 2),
             "hours_with_grouping": round(hours(grouped, teacher), 2)} for teacher in sweep.teachers]
    ce_hours = hours(separate, "")
    without = sum(row["hours_without_grouping"] for row in rows) + ce_hours
    with_groups = sum(row["hours_with_grouping"] for row in rows) + ce_hours
    print_table(f"projection: reproduce.py --preset {preset} ({len(sweep.teachers)} of its "
                f"{len(preset_sweep([], preset).teachers)} teachers, {len(sweep.seeds)} seeds, {sweep.epochs} epochs: "
                f"{len(grouped)} processes grouped, {len(separate)} not) on this device, {describe(cfg)}; hours "
                "projected from the steps measured here (evaluation left out)",
                ["teacher", "group speed-up", "hours without grouping", "hours with grouping"],
                [*([row["teacher"], ", ".join(f"{group['speedup']:.2f}x" for group in row["groups"]),
                    row["hours_without_grouping"], row["hours_with_grouping"]] for row in rows),
                 ["CE (one per seed)", "", round(ce_hours, 2), round(ce_hours, 2)],
                 ["all", "", round(without, 1), f"{with_groups:.1f} ({without / with_groups:.2f}x less time)"]])
    return {"preset": preset, "processes": {"grouped": len(grouped), "separate": len(separate)}, "teachers": rows,
            "ce_hours": round(ce_hours, 2), "hours_without_grouping": round(without, 2),
            "hours_with_grouping": round(with_groups, 2), "ratio": round(without / with_groups, 3)}
