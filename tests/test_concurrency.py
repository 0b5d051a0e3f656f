"""Processes sharing folders: one writer per run folder, a sweep that stops its runs, downloads made once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_clean_failure, run_script

import test_dih
import train_heads
import train_teacher
from runlock import RUN_LOCK, run_folder
from utils import UserError

FAST = ["--gpu_id", "cpu", "--batch_size", "64"]
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}


def wait_until(ready, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.01)


def epochs_on_disk(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def holder_pid(out: Path) -> int | None:
    """The PID recorded in a run folder's lock file, once its holder has written it."""
    try:
        text = (out / RUN_LOCK).read_text()
    except FileNotFoundError:
        return None
    return int(text.split()[1]) if text.startswith("PID ") else None


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def same_weights(a: Path, b: Path) -> bool:
    x, y = (torch.load(path, weights_only=True)["state_dict"] for path in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_run_folder_has_one_writer_and_a_killed_writer_lets_go(tiny_npz, tmp_path):
    """While a run trains, a second process aimed at its folder (with or without --resume) is refused in one line
    naming the holder, and changes nothing; after kill -9 of the holder, --resume takes the folder over and ends
    bit-identical to an undisturbed run."""
    flags = ["--model", "res8", "--dataset", str(tiny_npz), "--epochs", "3", "--schedule", "2", *FAST]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_teacher.main([*flags, "--out_dir", str(whole)])
    holder = subprocess.Popen([sys.executable, str(ROOT / "train_teacher.py"), *flags, "--out_dir", str(cut)],
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: epochs_on_disk(cut) >= 1, "the first epoch")
        holder.send_signal(signal.SIGSTOP)  # mid-run: it holds its lock, and writes nothing while the others try
        before = files(cut)
        assert holder_pid(cut) == holder.pid
        who = f"PID {holder.pid} on {socket.gethostname()}"
        assert_clean_failure(run_script("train_teacher.py", *flags, "--out_dir", str(cut), "--resume"), who)
        with pytest.raises(UserError, match=f"is in use by {who}"):
            train_teacher.main([*flags, "--out_dir", str(cut)])
        assert files(cut) == before
    finally:
        holder.kill()  # kill -9
        holder.wait()
    assert not (cut / "summary.json").exists(), "the holder was not interrupted"
    assert holder_pid(cut) == holder.pid  # its lock file stays behind; the lock itself went with the process

    train_teacher.main([*flags, "--out_dir", str(cut), "--resume"])
    assert same_weights(whole / "teacher.pt", cut / "teacher.pt")
    strip = lambda out: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                         for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert strip(whole) == strip(cut)
    assert not (cut / RUN_LOCK).exists()


HOLDER = """
import pathlib, sys, time
from runlock import run_folder

with run_folder(pathlib.Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("script", [train_teacher, train_heads, test_dih], ids=lambda m: f"{m.__name__}.py")
def test_each_stage_refuses_a_run_folder_that_another_process_holds(script, res8_teacher, micro_npz, tmp_path):
    """Every stage script claims its folder before it loads any data: with another process holding it, the run is
    refused, naming that process, and nothing in the folder changes."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = files(out)
        data = ["--dataset", str(micro_npz), "--epochs", "1", *FAST, "--out_dir", str(out)]
        teacher = ["--teacher", "res8", "--teacher_ckpt", str(res8_teacher)]
        argv = {train_teacher: ["--model", "res8"], train_heads: teacher, test_dih: ["--method", "kd", *teacher]}
        with pytest.raises(UserError, match=f"is in use by PID {holder.pid} on "):
            script.main([*argv[script], *data])
        assert files(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_one_process_holds_several_run_folders_but_each_once(tmp_path):
    """The lock's API for several runs in one process: one context per folder; a folder it created and left
    empty is removed again, one that holds files stays."""
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    with contextlib.ExitStack() as stack:
        stack.enter_context(run_folder(a))
        stack.enter_context(run_folder(b))
        assert holder_pid(a) == holder_pid(b) == os.getpid()
        with pytest.raises(UserError, match=f"--out_dir {a} is in use by this very process"), run_folder(a):
            pass
        assert holder_pid(a) == os.getpid()  # the refused second claim took nothing from the first
        (b / "log.txt").write_text("kept")
    assert not (tmp_path / "runs" / "a").exists() and sorted(p.name for p in b.iterdir()) == ["log.txt"]
    with run_folder(a):  # free again
        pass


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_sweep_stops_its_runs(tiny_npz, tmp_path, signum, code):
    """SIGTERM or SIGINT to reproduce.py ends every stage run it started before it exits, in one line."""
    argv = ["--dataset", str(tiny_npz), "--teachers", "res8", "--students", "res8", "--methods", "ce", "--seeds", "30",
            "--epochs", "200", "--runs_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results"),
            "--jobs", "2"]
    sweep = subprocess.Popen([sys.executable, str(ROOT / "reproduce.py"), *argv], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = [tmp_path / "runs" / "tiny" / name for name in ("teacher-res8-seed30", "student-res8-ce-seed30")]
    try:
        wait_until(lambda: all(holder_pid(run) for run in runs), "both runs to hold their folders")
        children = [holder_pid(run) for run in runs]
        sweep.send_signal(signum)
        stderr = sweep.communicate(timeout=120)[1]
    finally:
        sweep.kill()
    assert sweep.returncode == code
    assert_clean_failure(subprocess.CompletedProcess([], code, "", stderr), "rerun the same command to continue")
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for run in runs:
        assert not (run / RUN_LOCK).exists() and not (run / "summary.json").exists()
        assert "terminated (SIGTERM); rerun with --resume" in (run / "stderr.txt").read_text()


DOWNLOADER = """
import dataclasses, hashlib, json, pathlib, sys, time
import torch
import data

spec = json.loads(sys.argv[1])
barrier = pathlib.Path(spec["barrier"])
(barrier / sys.argv[2]).touch()
while len(list(barrier.iterdir())) < spec["processes"]:  # start together
    time.sleep(0.01)
sources = {"cifar10": dataclasses.replace(data.CIFAR_SOURCES["cifar10"], **spec["cifar10"]),
           "tinyimagenet": dataclasses.replace(data.TINYIMAGENET, **spec["tinyimagenet"])}
for name, source in sources.items():
    ds = data.load_dataset(name, spec["data_dir"], torch.device("cpu"), source=source)
    digest = hashlib.sha256(ds.x_train.numpy().tobytes() + ds.x_test.numpy().tobytes() + ds.y_train.numpy().tobytes())
    print(name, digest.hexdigest())
"""


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_concurrent_first_runs_fetch_and_decode_a_dataset_once(tmp_path, counting_http_server):
    """Three processes on a fresh --data_dir: one download of each archive from the (slow) server, one decoding of
    Tiny-ImageNet, and the same arrays in all three."""
    from helpers import make_archive, make_fake_cifar, source_for

    url, counts = counting_http_server
    cifar, _ = make_fake_cifar(tmp_path, "cifar10")  # written to tmp_path/serve, which the server serves
    tiny_zip = tmp_path / "serve" / "tiny-imagenet-200.zip"
    make_archive(tiny_zip)
    tiny = source_for(tiny_zip)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    spec = {"barrier": str(barrier), "processes": 3, "data_dir": str(tmp_path / "data"),
            "cifar10": {"url": f"{url}/{cifar.archive}", "archive_md5": cifar.archive_md5,
                        "train_files": cifar.train_files, "test_files": cifar.test_files},
            "tinyimagenet": {"url": f"{url}/{tiny_zip.name}", "archive_md5": tiny.archive_md5,
                             "archive_size": tiny.archive_size}}
    processes = [subprocess.Popen([sys.executable, "-c", DOWNLOADER, json.dumps(spec), str(i)], cwd=ROOT, env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
    assert counts == {f"/{cifar.archive}": 1, f"/{tiny_zip.name}": 1}
    digests = [sorted(line for line in out.splitlines() if line.startswith(("cifar10 ", "tinyimagenet ")))
               for out, _ in outputs]
    assert len(digests[0]) == 2 and digests[0] == digests[1] == digests[2]
    assert sum(out.count("decoding the") for out, _ in outputs) == 1
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        [cifar.archive, cifar.folder, tiny_zip.name, "tiny-imagenet-200.uint8"])  # no lock files or scratch left
