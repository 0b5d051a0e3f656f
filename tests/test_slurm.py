"""reproduce.py --slurm on a real one-node Slurm cluster started for the test, and its flags.

The cluster needs root and Debian's slurm-wlm and munge (.ci/run installs them). Where they are missing
the test is skipped, unless DIH_REQUIRE_SLURM is set, as .ci/run sets it: there a missing Slurm fails.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from datetime import datetime

import pytest
import torch
from slurm_cluster import one_node_cluster, unavailable

import reproduce
from runlock import run_folder
from sweep import slurm
from sweep.graph import build_graph
from sweep.grid import grid_flags, make_sweep
from utils import UserError

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


@pytest.fixture(scope="module")
def slurm_conf():
    reason = unavailable()
    if reason is not None:
        if os.environ.get("DIH_REQUIRE_SLURM"):
            pytest.fail(f"DIH_REQUIRE_SLURM is set, but {reason}")
        pytest.skip(reason)
    with one_node_cluster() as conf:
        yield conf


def job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict: JobState, StartTime, EndTime, ..."""
    text = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True,
                          check=True).stdout
    return dict(token.split("=", 1) for token in text.split() if "=" in token)


def started(info: dict[str, str]) -> datetime:
    return datetime.fromisoformat(info["StartTime"])


def ended(info: dict[str, str]) -> datetime:
    return datetime.fromisoformat(info["EndTime"])


def wait_for(job_id: str, timeout: float = 300) -> None:
    for _ in range(int(timeout)):
        if job(job_id)["JobState"] in FINAL_STATES:
            return
        time.sleep(1)
    pytest.fail(f"Slurm job {job_id} has not ended after {timeout:.0f} s: {job(job_id)}")


def test_the_demo_sweep_on_slurm_keeps_the_order_gives_the_local_table_and_resubmits_only_what_is_missing(
        slurm_conf, tiny_npz, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm_conf))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs inherit it: the same threads give the same sums
    grid = ["--preset", "demo", "--dataset", str(tiny_npz), "--epochs", "1", "--teacher_epochs", "1",
            "--heads_epochs", "1", "--seeds", "30"]
    on_slurm = [*grid, "--runs_dir", str(tmp_path / "slurm" / "runs"), "--results_dir", str(tmp_path / "slurm" / "res"),
                "--slurm", "--gpus_per_job", "0"]

    with pytest.raises(UserError, match="teacher res20 seed 30: sbatch failed: invalid partition specified: nope"):
        reproduce.main([*on_slurm, "--partition", "nope"])
    first = reproduce.main(on_slurm)
    # teacher, heads, CE, and one job for the KD and DIH students of the teacher run
    assert len(first.launched) == len(first.nodes) == 4 and first.report_job is not None
    (group,) = [node for node in first.nodes if len(node.runs) > 1]
    assert group.label == "kd dih students res8 <- res20 seed 30"
    queued = reproduce.main(on_slurm)  # at once: the runs are queued or running, none is submitted twice
    assert queued.launched == [] and queued.report_job is None and queued.jobs.items() <= first.jobs.items()

    local = reproduce.main([*grid, "--runs_dir", str(tmp_path / "local" / "runs"),
                            "--results_dir", str(tmp_path / "local" / "res")])  # meanwhile, the same grid here
    assert not local.failed and "| res20 | res8 |" in local.table
    wait_for(first.report_job)

    jobs = {node.out_dir: job(first.jobs[node.out_dir]) for node in first.nodes}
    for node in first.nodes:
        log = (node.out_dir / "log.txt").read_text()
        assert jobs[node.out_dir]["JobState"] == "COMPLETED", log + (node.out_dir / "stderr.txt").read_text()
        assert f"(Slurm job {first.jobs[node.out_dir]} on " in log.splitlines()[0]
        for dep in [*node.deps, *node.after]:  # afterok and afterany held: started once the runs before it ended
            needed = next(other for other in first.nodes if dep in other.runs)
            assert ended(jobs[needed.out_dir]) <= started(jobs[node.out_dir]), f"{node.label} started before {dep.name}"
    report = job(first.report_job)
    assert report["JobState"] == "COMPLETED"
    assert all(ended(info) <= started(report) for info in jobs.values())  # afterany held
    assert (tmp_path / "slurm" / "res" / "demo" / "results.md").read_text() == local.table

    again = reproduce.main(on_slurm)  # all finished: nothing submitted, the table at once
    assert again.launched == [] and not again.jobs and again.table == local.table

    kd, dih = group.runs
    dih_written = (dih / "student.pt").stat().st_mtime_ns
    (kd / "summary.json").unlink()  # as if its run had failed: only its group goes back to the queue
    redo = reproduce.main(on_slurm)
    assert redo.launched == [group] and list(redo.jobs) == [group.out_dir]
    wait_for(redo.report_job)
    assert (tmp_path / "slurm" / "res" / "demo" / "results.md").read_text() == local.table
    assert (dih / "student.pt").stat().st_mtime_ns == dih_written  # the finished student was left alone


def test_a_job_whose_run_folder_is_locked_says_so_and_fails(slurm_conf, tiny_npz, tmp_path, monkeypatch):
    """Another writer (here this test process) holds a run's folder when its job starts: the job trains nothing,
    says who holds the folder in one line of its stderr.txt, and fails, so the jobs after it are cancelled."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_conf))
    argv = ["--dataset", str(tiny_npz), "--teachers", "res8", "--methods", "ce", "--seeds", "30", "--epochs", "1",
            "--runs_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "res"), "--slurm",
            "--gpus_per_job", "0"]
    teacher = build_graph(make_sweep(reproduce.build_parser().parse_args(argv)))[0]
    with run_folder(teacher.out_dir):
        outcome = reproduce.main(argv)
        wait_for(outcome.jobs[teacher.out_dir])
    subprocess.run(["scancel", *outcome.jobs.values(), outcome.report_job], check=True)  # nothing more to see
    assert job(outcome.jobs[teacher.out_dir])["JobState"] == "FAILED"
    lines = (teacher.out_dir / "stderr.txt").read_text().splitlines()
    assert lines == [f"train_teacher.py: error: --out_dir {teacher.out_dir} is in use by PID {os.getpid()} on "
                     f"{socket.gethostname()}, since {lines[0].split(', since ')[1]}"] and "Traceback" not in lines[0]
    assert sorted(p.name for p in teacher.out_dir.iterdir()) == ["log.txt", "stderr.txt"]


def test_a_run_of_two_processes_is_one_job_of_two_srun_tasks(slurm_conf, tiny_npz, tmp_path, monkeypatch):
    """--gpus_per_run 2 on the CPU: each stage run is one job of 2 tasks that meet as one run of 2 processes."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_conf))
    argv = ["--dataset", str(tiny_npz), "--teachers", "res8", "--methods", "ce", "--seeds", "30", "--epochs", "1",
            "--runs_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "res"), "--slurm",
            "--gpus_per_job", "0", "--gpus_per_run", "2"]
    outcome = reproduce.main(argv)
    wait_for(outcome.report_job)
    for node in outcome.nodes:
        log = (node.out_dir / "log.txt").read_text()
        errors = (node.out_dir / "stderr.txt").read_text()
        assert job(outcome.jobs[node.out_dir])["JobState"] == "COMPLETED", log + errors
        assert log.count("final test accuracy") == 1, log  # rank 0 alone prints
        (run,) = node.runs
        assert json.loads((run / "summary.json").read_text())["config"]["sync_bn"] is True
        assert torch.load(next(run.glob("*.pt")), weights_only=True)["args"]["world_size"] == 2


def test_a_job_of_several_tasks_starts_them_with_srun_meeting_at_its_first_node(monkeypatch):
    scripts = []
    monkeypatch.setattr(slurm, "run", lambda argv, stdin=None: scripts.append(stdin) or "42\n")
    assert slurm.sbatch(["python", "train_teacher.py"], [], tasks=4) == "42"
    assert slurm.sbatch(["python", "train_teacher.py"], []) == "42"
    many, one = scripts
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in many
    assert many.endswith("exec srun --kill-on-bad-exit=1 python train_teacher.py\n")
    assert one.endswith("\nexec python train_teacher.py\n") and "srun" not in one


@pytest.mark.parametrize("argv", [
    ["--preset", "demo", "--dataset", "tiny.npz", "--epochs", "3", "--heads_epochs", "2", "--no-nesterov"],
    ["--teachers", "res20", "vgg11", "--methods", "dih", "kd", "--seeds", "1", "--schedule", "[]", "--wd", "0"],
])
def test_the_report_job_rebuilds_the_same_sweep_from_its_flags(argv):
    sweep = make_sweep(reproduce.build_parser().parse_args(argv))
    assert make_sweep(reproduce.build_parser().parse_args(grid_flags(sweep))) == sweep


@pytest.mark.parametrize(("argv", "message"), [
    (["--partition", "gpu"], "--partition is an option of --slurm"),
    (["--slurm", "--gpus", "0"], "--jobs and --gpus are for a sweep on this machine"),
    (["--slurm", "--jobs", "2"], "--jobs and --gpus are for a sweep on this machine"),
    (["--slurm", "--gpus_per_job", "two"], "--gpus_per_job 'two'"),
    (["--slurm", "--sbatch_args=--comment='x"], "--sbatch_args"),
    (["--nodes", "2"], "--nodes is an option of --slurm"),
    (["--slurm", "--nodes", "0"], "--nodes must be at least 1"),
    (["--slurm", "--gpus_per_run", "2", "--gpus_per_job", "a100:1"], "give them the same count"),
    (["--gpus_per_run", "3", "--jobs", "1"],
     "--batch_size 32 is each run's global batch, which its 3 processes share equally"),
])
def test_bad_slurm_flags_are_user_errors(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        reproduce.main(["--preset", "demo", *argv])


def test_without_slurm_commands_slurm_says_where_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="--slurm needs Slurm's squeue on the PATH"):
        reproduce.main(["--preset", "demo", "--runs_dir", str(tmp_path), "--slurm"])
