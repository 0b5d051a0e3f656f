"""Bad inputs of the newer features: each is one line on stderr and a non-zero exit, never a traceback, and
nothing is lost or half-written.

Tests run as root, where file permissions stop no write: an unwritable folder is made here with a path under a
regular file, a file-size limit (RLIMIT_FSIZE, set in the child or around one write) and, where this machine
lets root make a private mount namespace, a real read-only and a real full file system (tmpfs)."""

from __future__ import annotations

import functools
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_clean_failure, run_script

import cli
import engine
import reproduce
import test_dih
import train_heads
import train_teacher
from checkpoint import load_checkpoint
from utils import UserError, WriteError, atomic_write_text

FAST = ["--gpu_id", "cpu", "--batch_size", "64"]


def no_data(tmp_path: Path) -> list[str]:
    """Flags whose data, if it were loaded, would fail with a message of its own (a mirror that is not there)."""
    return ["--dataset", "cifar10", "--data_dir", str(tmp_path / "data"), "--data_url", str(tmp_path / "none.tgz"),
            "--gpu_id", "cpu"]


# ------------------------------------------------------------------------------------- the output folder


def test_an_out_dir_under_a_regular_file_is_refused_before_any_data(tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    with pytest.raises(UserError, match=f"--out_dir {out} cannot be created \\(Not a directory\\): choose a"):
        train_teacher.main([*no_data(tmp_path), "--out_dir", str(out)])


def test_a_file_size_limit_is_refused_before_any_data(tmp_path):
    """RLIMIT_FSIZE 0, as a full disk: the lock file, written and flushed before the data, cannot be."""
    out = tmp_path / "runs" / "run"

    def no_bytes() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    result = run_script("train_teacher.py", *no_data(tmp_path), "--out_dir", str(out), preexec_fn=no_bytes)
    assert_clean_failure(result, f"--out_dir {out} cannot be written (File too large): choose a writable --out_dir")
    assert not (tmp_path / "runs").exists()  # the folders it made to try are gone again


@functools.cache
def private_mounts() -> str | None:
    """Why no private mount namespace with a tmpfs can be made here (root with CAP_SYS_ADMIN), or None."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a private namespace: {probe.stderr.strip()}"


@pytest.mark.parametrize(("options", "fill", "failure"), [
    ("ro", "", "cannot be created (Read-only file system)"),
    ("size=4k", "cat /dev/zero > {mount}/fill 2>/dev/null;", "cannot be written (No space left on device)"),
])
def test_a_read_only_or_full_file_system_is_refused_before_any_data(tmp_path, options, fill, failure):
    reason = private_mounts()
    if reason is not None:
        pytest.skip(reason)
    mount = tmp_path / "mnt"
    mount.mkdir()
    out = mount / "run"
    script = f"mount -t tmpfs -o {options} tmpfs {mount} && {fill.format(mount=mount)} exec \"$@\""
    argv = ["unshare", "-m", "sh", "-c", script, "sh", sys.executable, str(ROOT / "train_teacher.py"),
            *no_data(tmp_path), "--out_dir", str(out)]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert_clean_failure(result, f"--out_dir {out} {failure}")


def test_a_write_error_mid_run_is_one_line_and_keeps_the_last_checkpoint(micro_npz, tmp_path, monkeypatch):
    """From the second epoch on, no file may grow past 64 kB (a disk filling up): the second checkpoint fails,
    the first stays as it was, and --resume later finishes the run."""
    out = tmp_path / "run"
    flags = ["--model", "res8", "--dataset", str(micro_npz), "--epochs", "2", "--out_dir", str(out), *FAST]
    save, saves = engine.Run._save_progress, []

    def disk_fills_after_the_first(*args):
        saves.append(None)
        if len(saves) == 1:
            return save(*args)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        try:
            return save(*args)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(engine.Run, "_save_progress", disk_fills_after_the_first)
    with pytest.raises(UserError) as exc:
        train_teacher.main(flags)
    last = out / "last.pt"
    assert str(exc.value) == (f"cannot write {last} (File too large); {last} still holds epoch 1: make room (or fix "
                              "the folder), then rerun with --resume")
    assert len(load_checkpoint(last, "resume", "test")["history"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.jsonl"]  # no temporary file left
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.undo()
    assert train_teacher.main([*flags, "--resume"])["epochs"] == 2


def test_an_atomic_write_that_fails_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(WriteError, match=f"cannot write {target} \\(File too large\\)"):
            atomic_write_text(target, "x" * 5000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("which", ["runs_dir", "results_dir"])
def test_a_sweep_with_an_unusable_folder_is_refused_before_anything_runs(tiny_npz, tmp_path, which):
    (tmp_path / "file").write_text("")
    folders = {"runs_dir": tmp_path / "runs", "results_dir": tmp_path / "results"}
    folders[which] = tmp_path / "file" / which if which == "runs_dir" else tmp_path / "file"
    argv = ["--dataset", str(tiny_npz), "--teachers", "res8", "--methods", "ce", "--seeds", "30", "--epochs", "1",
            "--runs_dir", str(folders["runs_dir"]), "--results_dir", str(folders["results_dir"])]
    with pytest.raises(UserError, match=f"--{which} {folders[which]} (cannot be written|is a file, not a folder)"):
        reproduce.main(argv)
    assert not (tmp_path / "runs" / "tiny").exists()  # no run was started


# ---------------------------------------------------------------------------------------- sizes and values


@pytest.mark.parametrize("flag", ["--nce_k", "--feat_dim"])
def test_crd_sizes_that_cannot_fit_are_refused_before_allocating(micro_npz, res8_teacher, tmp_path, flag):
    out = tmp_path / "crd"
    with pytest.raises(UserError, match=f"{flag} 100000000000\\b.*: CRD needs at least .* GB .* available; lower"):
        test_dih.main(["--method", "crd", "--teacher", "res8", "--teacher_ckpt", str(res8_teacher), "--dataset",
                       str(micro_npz), "--epochs", "1", "--out_dir", str(out), flag, "100000000000", *FAST])
    assert not out.exists()


def test_host_out_of_memory_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_teacher.py"])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main_guard(lambda argv: torch.empty(2**62, dtype=torch.uint8))
    finally:
        signal.signal(signal.SIGTERM, handler)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("train_teacher.py: error: out of host memory (") and "--batch_size" in err


def test_seeds_are_what_torch_can_seed(capsys):
    parser = cli.common_parser("seeds")
    for seed in (2**64 - 1, -(2**63)):
        cli.parse(parser, ["--seed", str(seed), "--gpu_id", "cpu"])
        torch.Generator().manual_seed(seed)
    for seed in (10**23, 2**64, -(2**63) - 1):
        with pytest.raises((RuntimeError, ValueError)):  # torch's own limit, which the check follows
            torch.Generator().manual_seed(seed)
        with pytest.raises(UserError, match=f"--seed {seed} is out of range"):
            cli.parse(parser, ["--seed", str(seed), "--gpu_id", "cpu"])
    with pytest.raises(UserError, match=f"--seeds {10**23} is out of range"):
        reproduce.main(["--preset", "demo", "--seeds", "30", str(10**23), "--dry_run"])


def test_every_float_flag_refuses_values_that_are_not_finite(monkeypatch, capsys):
    from helpers import parsers_and_help

    checked = set()
    for script, (parser, _) in parsers_and_help(monkeypatch, capsys).items():
        for action in parser._actions:
            assert action.type is not float, f"{script} {action.option_strings[0]} takes any float"
            if action.type is not cli.finite_float:
                continue
            flag = action.option_strings[0]
            for value in ("inf", "-inf", "nan"):
                with pytest.raises(SystemExit):
                    parser.parse_args([f"{flag}={value}"])
                err = capsys.readouterr().err
                assert err.count("\n") == 1 and f"argument {flag}: must be a finite number, got '{value}'" in err
            checked.add((script, flag))
    assert {("train_teacher.py", "--lr"), ("train_heads.py", "--wd"), ("test_dih.py", "--beta"),
            ("test_dih.py", "--orth"), ("reproduce.py", "--alpha")} <= checked


def test_printed_commands_quote_paths(res8_teacher, tmp_path, monkeypatch):
    """The "train it with:" commands of refusals are one shell command each, whatever the paths hold."""
    monkeypatch.chdir(tmp_path)
    dataset = tmp_path / "my data" / "set $1.npz"
    with pytest.raises(UserError) as exc:
        train_heads.main(["--teacher", "res8", "--dataset", str(dataset), "--gpu_id", "cpu"])
    assert shlex.split(str(exc.value).split("train it with: ")[1]) == [
        "python3", "train_teacher.py", "--model", "res8", "--dataset", str(dataset), "--seed", "30"]

    teacher = tmp_path / "a teacher's" / "teacher.pt"
    teacher.parent.mkdir()
    shutil.copy(res8_teacher, teacher)
    with pytest.raises(UserError) as exc:
        test_dih.main(["--method", "takd", "--teacher", "res8", "--teacher_ckpt", str(teacher), "--ta", "res14",
                       "--dataset", str(dataset), "--alpha", "0.3", "--gpu_id", "cpu"])
    assert shlex.split(str(exc.value).split("train the assistant with: ")[1]) == [
        "python3", "test_dih.py", "--method", "kd", "--student", "res14", "--teacher", "res8", "--teacher_ckpt",
        str(teacher), "--dataset", str(dataset), "--seed", "30", "--alpha=0.3"]
