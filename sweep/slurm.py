"""The graph on a Slurm cluster: one batch job per unfinished node (a stage run, or a group of students), then one
that writes the table.

Each job runs its node's command (the stage script, with --resume) from the folder reproduce.py was
started in, appends its output to the node's log.txt and stderr.txt, and waits `afterok` for the jobs
of the runs it needs; a failed run cancels the jobs waiting for it (--kill-on-invalid-dep). The report
job waits `afterany` for all of them, so that a failed run is a dash in the table, not a table never written.

Plain sbatch calls rather than submitit: submitit runs pickled Python functions, must be importable on every
node and keeps logs in folders of its own, whereas these jobs are shell commands already, their logs belong
in the run folders, and sbatch's flags are the ones a cluster's documentation gives. One subprocess call per
job is less code than adapting submitit to that, and no new dependency.

Every job carries its run folders as its Slurm comment (a group of students: all of theirs), so a second
submission sees in squeue which runs are already queued or running, and waits for those jobs rather than
submitting a second job into the same folder.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from utils import UserError

from .graph import ROOT, Node, Outcome, finished_runs
from .grid import Sweep, grid_flags


@dataclass(frozen=True)
class SlurmOptions:
    """The cluster's own options: every job gets them as sbatch flags, the GPU request only the stage runs."""

    partition: str | None
    account: str | None
    time: str | None
    gpus: str  # per node of a stage run, as in --gres=gpu:<gpus>: `1`, `a100:1`; `0` runs on the CPU
    extra: tuple[str, ...]
    tasks_per_node: int = 1  # processes of a stage run on each of its nodes (--gpus_per_run)
    nodes: int = 1  # nodes of a stage run

    @property
    def tasks(self) -> int:
        """Processes of a stage run: where more than 1, srun starts them."""
        return self.tasks_per_node * self.nodes

    def flags(self) -> list[str]:
        named = {"partition": self.partition, "account": self.account, "time": self.time}
        return [f"--{key}={value}" for key, value in named.items() if value is not None] + list(self.extra)


def check_gpus(text: str) -> str:
    """--gpus_per_job: `0`, or a count of at least 1 with an optional GPU type, as `--gres=gpu:` takes it."""
    if text != "0" and not re.fullmatch(r"([\w.-]+:)?[1-9]\d*", text):
        raise UserError(f"--gpus_per_job {text!r}: give a count like 1, a type and count like a100:1, or 0 for the CPU")
    return text


def submit(nodes: list[Node], sweep: Sweep, options: SlurmOptions, log: Callable[[str], None] = print) -> Outcome:
    """Submit every unfinished node that is not queued already and, if any was, the report job."""
    outcome = Outcome(nodes)
    queued = queued_jobs()  # read before the summaries: a job that ends in between has written its summary
    done = finished_runs(nodes, sweep.dataset)
    run_jobs: dict[Path, str] = {}  # the job that trains each unfinished run
    cwd = Path.cwd()
    for node in nodes:  # build order: the jobs of the runs a node needs are known when its turn comes
        unfinished = [run for run in node.runs if run not in done]
        if not unfinished:
            continue
        out = node.out_dir.resolve()
        waiting = list(dict.fromkeys(queued[str(run.resolve())] for run in unfinished if str(run.resolve()) in queued))
        if len(waiting) == 1 and all(str(run.resolve()) in queued for run in unfinished):
            job = waiting[0]  # queued or running already
        else:  # (a run some other job still trains is left to it: this job resumes after that one has ended)
            out.mkdir(parents=True, exist_ok=True)  # Slurm opens the logs before the job starts
            after = list(dict.fromkeys(run_jobs[dep] for dep in node.deps if dep not in done))
            waiting += [run_jobs[dep] for dep in node.after if dep not in done and run_jobs[dep] not in waiting]
            comment = COMMENT_SEPARATOR.join(str(run.resolve()) for run in node.runs)
            flags = [f"--job-name={out.name}", f"--chdir={cwd}", f"--comment={comment}", f"--output={out}/log.txt",
                     f"--error={out}/stderr.txt", "--open-mode=append"]
            flags += [f"--gres=gpu:{options.gpus}"] if options.gpus != "0" else []
            if options.tasks > 1:
                flags += [f"--nodes={options.nodes}", f"--ntasks-per-node={options.tasks_per_node}"]
            dependency = ([f"afterok:{':'.join(after)}"] if after else []) + (
                [f"afterany:{':'.join(waiting)}"] if waiting else [])
            flags += [f"--dependency={','.join(dependency)}", "--kill-on-invalid-dep=yes"] if dependency else []
            argv = node.argv + (["--gpu_id", "cpu"] if options.gpus == "0" else [])
            try:
                job = sbatch(argv, flags + options.flags(), tasks=options.tasks)
            except UserError as err:
                before = (f"; the {len(outcome.launched)} jobs submitted before it stay queued, and the same command "
                          "submits the rest" if outcome.launched else "")
                raise UserError(f"{node.label}: {err}{before}") from None
            outcome.launched.append(node)
        outcome.jobs[node.out_dir] = job
        run_jobs |= dict.fromkeys(unfinished, job)
    runs = sum(len(node.runs) for node in nodes)
    log(f"{runs} stage runs in {len(nodes)} jobs: {len(done)} runs finished, "
        f"{len(outcome.jobs) - len(outcome.launched)} jobs already queued or running, {len(outcome.launched)} "
        "submitted now")
    if not outcome.launched:
        if outcome.jobs:
            log("nothing submitted: the jobs already queued finish the sweep, and the report job submitted with them "
                "writes the table (--report_only writes it at any time)")
        return outcome
    results = (sweep.results_dir / sweep.name).resolve()
    results.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(ROOT / "reproduce.py"), "--report_only", *grid_flags(sweep)]
    flags = [f"--job-name=report-{sweep.name}", f"--chdir={cwd}", f"--output={results}/report.log",
             "--open-mode=append", f"--dependency=afterany:{':'.join(dict.fromkeys(outcome.jobs.values()))}"]
    outcome.report_job = sbatch(argv, flags + options.flags())
    log(f"job {outcome.report_job} writes the table to {results} once they have all ended; watch: squeue --me")
    return outcome


COMMENT_SEPARATOR = "|"  # between the run folders in a group job's comment


def queued_jobs() -> dict[str, str]:
    """Run folder → job id, for this user's jobs still on the queue, from the comments `submit` gives them (a
    group's job lists all its run folders)."""
    lines = run(["squeue", "--me", "--noheader", "--format=%i %k"]).splitlines()
    return {folder: job for job, _, comment in (line.strip().partition(" ") for line in lines)
            for folder in comment.split(COMMENT_SEPARATOR)}


def sbatch(argv: list[str], flags: list[str], tasks: int = 1) -> str:
    """Submit one command as a batch job whose log starts with the command itself; return the job's id.

    A job of several `tasks` runs it under srun, once per task, the tasks meeting at the job's first node (each
    one's rank is srun's SLURM_PROCID: distributed.py); --kill-on-bad-exit stops them all when one dies."""
    command = shlex.join(argv)
    header = f'echo {shlex.quote(f"$ {command}")} "(Slurm job $SLURM_JOB_ID on $(hostname))"'
    if tasks > 1:
        meet = ('export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"\n'
                "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))\n")
        script = f"#!/bin/sh\n{header}\n{meet}exec srun --kill-on-bad-exit=1 {command}\n"
    else:
        script = f"#!/bin/sh\n{header}\nexec {command}\n"
    return run(["sbatch", "--parsable", *flags], script).split(";")[0].strip()


def run(argv: list[str], stdin: str | None = None) -> str:
    """A Slurm command's output; its refusal (a partition, an account, a time limit) is the user's to fix."""
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(f"--slurm needs Slurm's {argv[0]} on the PATH: run it on the cluster's login node") from None
    if result.returncode != 0:
        lines = [line.removeprefix(f"{argv[0]}: error: ").strip() for line in result.stderr.splitlines()]
        raise UserError(f"{argv[0]} failed: {'; '.join(filter(None, lines)) or f'exit {result.returncode}'}")
    return result.stdout
