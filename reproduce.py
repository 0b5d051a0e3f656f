"""Reproduce a table of the paper in one command: a resumable sweep over teachers, methods and seeds.

    python reproduce.py --preset paper-cifar100 --jobs 2 --gpus 0,1
    python reproduce.py --preset demo                                   # synthetic data: 3 minutes on 2 slow cores
    python reproduce.py --preset paper-cifar100 --slurm --partition gpu  # one Slurm job per node of the graph
    python reproduce.py --preset paper-cifar100 --gpus_per_run 4 --slurm --nodes 2  # each run on 8 GPUs (srun)
    python reproduce.py --preset paper-cifar100 --report_only           # the table so far, of a sweep under way
    python reproduce.py --preset paper-cifar10 --dry_run                # the stage commands, by dependency level
    python reproduce.py --preset repdistiller-cifar100 --import_teachers save/models  # RepDistiller's benchmark

The sweep is a dependency graph of stage runs: each teacher is trained once per seed, its heads once,
then every student (the CE baseline needs no teacher, so one CE run per student and seed serves every
teacher's row). The students that one teacher run teaches train side by side in one process, sharing
each batch and each teacher pass (--no_group: one process each). Each run is trained by a stage script,
always with --resume, in the folder that script would choose itself, re-rooted under --runs_dir. A
finished run is skipped without starting a process and an interrupted one continues where it stopped,
so rerunning the same command after a crash finishes the table, and otherwise costs seconds. The table and plots go to
--results_dir/<preset>/: final-epoch test accuracy, mean ± sample std over seeds. The pieces are in sweep/.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

import cli
from data import dataset_tag
from sweep.graph import Node, Outcome, build_graph, finished_runs, listing
from sweep.grid import PRESETS, absent_rows, add_grid_flags, make_sweep
from sweep.local import exclusive, execute, gpu_groups, parse_gpus
from sweep.report import report
from sweep.slurm import SlurmOptions, check_gpus, submit
from utils import UserError, check_writable_dir

SLURM_FLAGS = ("partition", "account", "time", "gpus_per_job", "sbatch_args", "nodes")


def build_parser() -> cli.Parser:
    presets = "; ".join(f"{name}: {grid['dataset']}, " + (f"teachers {' '.join(grid['teachers'])}" if "teachers" in grid
                                                          else f"pairs {' '.join(map(':'.join, grid['pairs']))}")
                        for name, grid in PRESETS.items())
    p = cli.Parser(description=__doc__.splitlines()[0],
                   epilog=f"Presets: {presets}. Flags override the preset's values; without a preset, the paper's.")
    add_grid_flags(p)
    p.add_argument("--no_group", action="store_true",
                   help="one process per student (default: the students of each teacher run train as one group, "
                        "sharing each batch and each teacher pass; the same numbers)")
    p.add_argument("--gpus_per_run", type=int, default=1,
                   help="processes (GPUs) of each stage run on a node: torchrun starts them here, srun on Slurm; "
                        "the runs then take --sync_bn, so that they train what one GPU trains")
    here = p.add_argument_group("on this machine")
    here.add_argument("--jobs", type=int, help="stage processes at once per device (default 1; the preset's where it "
                                                 "names one: demo, 2)")
    here.add_argument("--gpus", help="spread the processes over these GPUs, e.g. 0,1 (default: each script's choice)")
    cluster = p.add_argument_group("on a Slurm cluster (with --slurm)")
    cluster.add_argument("--partition", help="the partition of every job")
    cluster.add_argument("--account", help="the account every job is charged to")
    cluster.add_argument("--time", help="each job's time limit, as sbatch takes it, e.g. 1-00:00:00")
    cluster.add_argument("--gpus_per_job", help="GPUs of each stage run: 1 (default), a type and count such as "
                                                "a100:1, or 0 to run on the CPU")
    cluster.add_argument("--sbatch_args", help="more sbatch flags for every job, e.g. --sbatch_args='--qos=long'")
    cluster.add_argument("--nodes", type=int, help="nodes of each stage run, each with --gpus_per_run processes "
                                                   "(default: 1)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--slurm", action="store_true", help="submit the runs to Slurm, each after the runs it needs, "
                                                           "and a last job that writes the table")
    mode.add_argument("--report_only", action="store_true", help="write the table and plots of the runs finished "
                                                                 "so far; run nothing")
    mode.add_argument("--dry_run", action="store_true", help="print every stage command by dependency level; "
                                                             "run none")
    return p


def slurm_options(args: argparse.Namespace) -> SlurmOptions | None:
    """--slurm's options, checked; None without --slurm, where a cluster flag would silently do nothing."""
    given = [f"--{key}" for key in SLURM_FLAGS if getattr(args, key) is not None]
    if not args.slurm:
        if given:
            raise UserError(f"{given[0]} is an option of --slurm")
        return None
    if args.jobs not in (None, 1) or args.gpus is not None:
        raise UserError("--jobs and --gpus are for a sweep on this machine; with --slurm use --gpus_per_job")
    try:
        extra = tuple(shlex.split(args.sbatch_args or ""))
    except ValueError as err:
        raise UserError(f"--sbatch_args {args.sbatch_args!r}: {err}") from None
    gpus = check_gpus(args.gpus_per_job or str(args.gpus_per_run))
    if gpus != "0" and int(gpus.rsplit(":", 1)[-1]) != args.gpus_per_run:
        raise UserError(f"--gpus_per_job {gpus} gives each node of a run {gpus.rsplit(':', 1)[-1]} GPU(s), but "
                        f"--gpus_per_run {args.gpus_per_run} starts {args.gpus_per_run} process(es) on it: give them "
                        "the same count")
    nodes = 1 if args.nodes is None else args.nodes
    if nodes < 1:
        raise UserError(f"--nodes must be at least 1, got {nodes}")
    return SlurmOptions(args.partition, args.account, args.time, gpus, extra, args.gpus_per_run, nodes)


def on_many_processes(nodes: list[Node], processes: int) -> list[Node]:
    """The nodes' commands for runs of `processes` processes in all: with --sync_bn, whose batch norm reads the
    global batch, so that the runs train what one process trains."""
    if processes == 1:
        return nodes
    return [dataclasses.replace(node, argv=[*node.argv, "--sync_bn"]) for node in nodes]


def main(argv: list[str] | None = None) -> Outcome:
    """Run, submit, list or tabulate the sweep; the outcome lets tests look inside."""
    args = build_parser().parse_args(argv)
    jobs = args.jobs if args.jobs is not None else PRESETS.get(args.preset, {}).get("jobs", 1)
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if args.gpus_per_run < 1:
        raise UserError(f"--gpus_per_run must be at least 1, got {args.gpus_per_run}")
    slurm = slurm_options(args)
    gpus = gpu_groups(parse_gpus(args.gpus), args.gpus_per_run, jobs)
    sweep = make_sweep(args)
    processes = args.gpus_per_run * (slurm.nodes if slurm else 1)
    if sweep.batch_size % processes:
        raise UserError(f"--batch_size {sweep.batch_size} is each run's global batch, which its {processes} processes "
                        f"share equally: give a multiple of {processes}")
    for line in absent_rows(sweep):
        print(f"note: {line}", file=sys.stderr)
    nodes = on_many_processes(build_graph(sweep, group=not args.no_group), processes)
    if not args.dry_run:  # a folder that cannot hold the results is refused before anything runs
        if not args.report_only:
            check_writable_dir(sweep.runs_dir, "--runs_dir")
        check_writable_dir(sweep.results_dir, "--results_dir")
    if args.dry_run:
        print(listing(nodes))
        return Outcome(nodes)
    if args.report_only:
        outcome = Outcome(nodes)
        runs = sum(len(node.runs) for node in nodes)
        print(f"{len(finished_runs(nodes, sweep.dataset))} of {runs} stage runs have finished ({len(nodes)} "
              "processes in the graph)")
    else:
        with exclusive(sweep.runs_dir / dataset_tag(sweep.dataset)):
            outcome = (submit(nodes, sweep, slurm) if slurm else
                       execute(nodes, sweep.dataset, jobs, gpus, processes=args.gpus_per_run))
        if outcome.jobs:  # on Slurm, with runs still to come: the report job writes the table after them
            return outcome
    outcome.table = report(sweep)
    files = "results.md results.csv curves.png bars.png gap.png" + (" literature.csv" if sweep.published else "")
    print(f"\n{outcome.table}\nwritten to {sweep.results_dir / sweep.name}: {files}")
    if outcome.failed or outcome.skipped:
        print(f"{len(outcome.failed)} stage run(s) failed and {len(outcome.skipped)} were skipped (see above); "
              f"rerun the same command to retry them", file=sys.stderr)
    return outcome


if __name__ == "__main__":
    cli.main_guard(lambda argv: sys.exit(1 if main(argv).failed else 0), "rerun the same command to continue")
