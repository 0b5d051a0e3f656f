"""One run on two processes (gloo on the CPU), launched as torchrun and as srun would: the same numbers as one
process, rank 0 alone writes and holds the folder, a lost rank ends the job, --resume continues it exactly."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import cli
import distributed
import engine
import train_teacher
from data import from_arrays, make_synthetic, save_npz
from data.device import shard_bounds
from models import build_model
from runlock import run_folder
from stages import TeacherTraining
from utils import UserError

# 100 training images in global batches of 50 (25 a process), 3 epochs: losses agree to ~1e-5 at this LR.
RECIPE = ["--model", "res8", "--epochs", "3", "--batch_size", "50", "--lr", "0.05", "--amp", "off", "--sync_bn"]
STOP_WITHIN_S = 60


@pytest.fixture(scope="module")
def hundred_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "hundred.npz"
    save_npz(path, *make_synthetic(100, 50, seed=0))
    return path


def bare_env(**extra: str) -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **extra}


def torchrun(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node 2 script args` (torch.distributed.run, as the torchrun command)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / script), *args], cwd=ROOT, env=env or bare_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_srun(script: str, *args: str) -> list[subprocess.Popen]:
    """The processes of a 2-task job step as srun starts them: no launcher, only each one's environment."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=bare_env(SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                                          SLURM_LOCALID=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for rank in range(2)]


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def epochs_on_disk(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def wait_for_epoch(out: Path, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 240
    while epochs_on_disk(out) < 1:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no epoch was written"
        time.sleep(0.01)


def rows(out: Path) -> list[dict]:
    """metrics.jsonl without the measured seconds."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path, name: str = "teacher.pt") -> dict[str, torch.Tensor]:
    return torch.load(out / name, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def two_processes(hundred_npz, tmp_path_factory) -> Path:
    """The recipe run uninterrupted on 2 processes under torchrun."""
    out = tmp_path_factory.mktemp("two") / "run"
    code, stdout, stderr = finish(torchrun("train_teacher.py", *RECIPE, "--dataset", str(hundred_npz), "--out_dir",
                                           str(out)))
    assert code == 0, stderr
    assert stdout.count("final test accuracy") == 1, stdout  # rank 0 alone prints
    return out


def test_shards_are_contiguous_cover_every_row_once_and_differ_by_at_most_one():
    for total, world in ((50, 2), (7, 3), (3, 4)):
        bounds = [shard_bounds(total, rank, world) for rank in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_two_processes_train_what_one_process_trains(two_processes, hundred_npz, tmp_path):
    alone = tmp_path / "alone"
    train_teacher.main([*RECIPE, "--dataset", str(hundred_npz), "--out_dir", str(alone), "--gpu_id", "cpu"])
    one, two = rows(alone), rows(two_processes)
    assert len(one) == len(two) == 3
    # Float rounding grows along the steps as fast as between two thread counts of one process: the epoch means
    # agree to ~1e-5 here, the weights only to ~1e-3 (as 1 and 2 threads do).
    for a, b in zip(one, two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-3)
        assert (b["train_acc"], b["test_acc"]) == (a["train_acc"], a["test_acc"])  # every image counted once
    stored = torch.load(two_processes / "teacher.pt", weights_only=True)["args"]
    assert stored["world_size"] == 2


def test_a_killed_rank_stops_the_torchrun_job_naming_it_and_resume_continues_exactly(
        two_processes, hundred_npz, tmp_path):
    out, job = tmp_path / "run", uuid.uuid4().hex
    argv = [*RECIPE, "--dataset", str(hundred_npz), "--out_dir", str(out)]
    proc = torchrun("train_teacher.py", *argv, env=bare_env(DIH_TEST_JOB=job))
    wait_for_epoch(out, [proc])
    killed = time.monotonic()
    os.kill(worker_pid(job, rank=1), signal.SIGKILL)
    code, _, stderr = finish(proc)
    assert code != 0 and time.monotonic() - killed < STOP_WITHIN_S
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", stderr), stderr
    assert (out / "last.pt").exists() and not (out / "summary.json").exists(), "the run was not interrupted"
    code, stdout, stderr = finish(torchrun("train_teacher.py", *argv, "--resume"))
    assert code == 0, stderr
    assert re.search(r"^resuming .* after epoch \d+$", stdout, re.M), stdout
    assert rows(out) == rows(two_processes)
    for name, tensor in weights(two_processes).items():
        assert torch.equal(weights(out)[name], tensor), name  # bit for bit


def worker_pid(job: str, rank: int) -> int:
    """The PID of torchrun's worker of `rank` in the job whose environment carries DIH_TEST_JOB=job."""
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"DIH_TEST_JOB={job}".encode() in environ and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank}")


def test_a_killed_task_of_an_srun_job_stops_the_others_with_one_line_naming_it(hundred_npz, tmp_path):
    """Without --sync_bn, too: each process keeps its own batch-norm statistics within an epoch and takes rank 0's
    at its end (else the epoch's same-state check would stop the job before the kill)."""
    out = tmp_path / "run"
    recipe = [flag for flag in RECIPE if flag != "--sync_bn"]
    procs = as_srun("train_teacher.py", *recipe, "--dataset", str(hundred_npz), "--out_dir", str(out))
    wait_for_epoch(out, procs)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code, _, stderr = finish(procs[0])
    procs[1].wait()
    assert time.monotonic() - killed < STOP_WITHIN_S
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1, stderr
    assert "train_teacher.py: rank 0: error: lost rank(s) 1 of the job's 2 processes" in lines[0], stderr
    assert (out / "last.pt").exists() and not (out / "summary.json").exists()


def test_a_hung_task_stops_the_others_after_the_timeout_with_one_line_naming_it(hundred_npz, tmp_path):
    out = tmp_path / "run"
    procs = as_srun("train_teacher.py", *RECIPE, "--dataset", str(hundred_npz), "--out_dir", str(out),
                    "--dist_timeout", "3")
    wait_for_epoch(out, procs)
    procs[1].send_signal(signal.SIGSTOP)  # alive, holding its connections, answering nothing
    stopped = time.monotonic()
    try:
        code, _, stderr = finish(procs[0], timeout=STOP_WITHIN_S)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert time.monotonic() - stopped < STOP_WITHIN_S
    assert code == 1 and "rank 0: error: lost rank(s) 1 of the job's 2 processes" in stderr, stderr
    assert "Timed out" in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_sigterm_stops_every_task_with_the_last_finished_epoch_kept(hundred_npz, tmp_path):
    out = tmp_path / "run"
    procs = as_srun("train_teacher.py", *RECIPE, "--dataset", str(hundred_npz), "--out_dir", str(out))
    wait_for_epoch(out, procs)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    results = [finish(proc, timeout=STOP_WITHIN_S) for proc in procs]
    assert [code for code, _, _ in results] == [143, 143], results
    assert "terminated (SIGTERM)" in results[0][2]
    kept = epochs_on_disk(out)
    assert kept >= 1 and len(torch.load(out / "last.pt", weights_only=True)["history"]) == kept


def test_rank_zero_holds_the_folder_and_a_busy_one_stops_every_rank_with_one_line(hundred_npz, tmp_path):
    out = tmp_path / "run"
    with run_folder(out):
        procs = as_srun("train_teacher.py", *RECIPE, "--dataset", str(hundred_npz), "--out_dir", str(out))
        results = [finish(proc, timeout=120) for proc in procs]
    assert [code for code, _, _ in results] == [2, 2], results
    lines = [line for _, _, err in results for line in err.splitlines()]
    assert len(lines) == 1 and "is in use by" in lines[0], lines


def test_rank_zero_alone_writes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    data = from_arrays(*make_synthetic(16, 8, seed=0), torch.device("cpu"))
    cfg = engine.TrainConfig(epochs=1, batch_size=8, lr=0.1, momentum=0.9, wd=5e-4, nesterov=True, schedule=(),
                             gamma=0.1, seed=0)
    stage = TeacherTraining(build_model("res8", data.num_classes), "res8")
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    summary = engine.fit(stage, data, cfg, tmp_path, {}, log=lambda line: None)
    assert summary["epochs"] == 1 and list(tmp_path.iterdir()) == []


def test_a_run_resumed_on_another_number_of_processes_is_refused(two_processes, tmp_path):
    cut = tmp_path / "run"
    shutil.copytree(two_processes, cut)
    (cut / "summary.json").unlink()  # as if killed after its last epoch
    args = json.loads(json.dumps(torch.load(cut / "last.pt", weights_only=True)["args"]))
    argv = [*RECIPE, "--dataset", args["dataset"], "--out_dir", str(cut), "--gpu_id", "cpu", "--resume"]
    with pytest.raises(UserError, match=r"started on 2 process\(es\), here it runs on 1; resume it on 2"):
        train_teacher.main(argv)


@pytest.mark.parametrize("rank, printed", [(0, True), (1, False)])
def test_a_global_batch_that_the_processes_cannot_share_is_one_line_from_rank_zero(
        rank, printed, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_teacher.py"])
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        cli.main_guard(lambda argv: cli.parse(cli.common_parser(""), ["--batch_size", "33", "--gpu_id", "cpu"]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    expected = "train_teacher.py: rank 0: error: --batch_size 33 is the global batch, which 2 processes share " \
               "equally: give a multiple of 2\n"
    assert err == (expected if printed else "")


def test_a_group_of_students_with_crd_trains_on_two_processes_what_it_trains_on_one(res8_teacher, micro_npz, tmp_path):
    """KD and CRD side by side (one teacher pass a batch) under torchrun: CRD's negatives are drawn for the global
    batch and its memory banks updated from it, so both students match their one-process runs (and every rank holds
    the same banks: each epoch checks it)."""
    import test_dih

    argv = ["--method", "kd", "crd", "--student", "res8", "--teacher", "res8", "--teacher_ckpt", str(res8_teacher),
            "--dataset", str(micro_npz), "--epochs", "1", "--batch_size", "32", "--lr", "0.05", "--amp", "off",
            "--sync_bn", "--nce_k", "16"]
    folders = {where: [flag for m in ("kd", "crd") for flag in (f"--{m}.out_dir", str(tmp_path / where / m))]
               for where in ("one", "two")}
    code, _, stderr = finish(torchrun("test_dih.py", *argv, *folders["two"]))
    assert code == 0, stderr
    test_dih.main([*argv, "--gpu_id", "cpu", *folders["one"]])
    for method in ("kd", "crd"):
        (one,), (two,) = rows(tmp_path / "one" / method), rows(tmp_path / "two" / method)
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4), method
        assert (two["train_acc"], two["test_acc"]) == (one["train_acc"], one["test_acc"]), method
