"""What --resume checks beyond the arguments: the networks a run learns from, its memory layout, and when a run
is finished; and where TAKD looks for its assistant."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

import cli
import engine
import test_dih
import train_heads
import train_teacher
from checkpoint import load_checkpoint, save_checkpoint
from methods.takd import read_assistant
from utils import UserError, fingerprint

FAST = ["--gpu_id", "cpu", "--batch_size", "64"]


@pytest.fixture(scope="module")
def networks(micro_npz, res8_teacher, tmp_path_factory) -> dict[str, Path]:
    """A teacher, heads on it and a KD student of it (an assistant), each also as a "retrained" copy."""
    root = tmp_path_factory.mktemp("networks")
    common = ["--teacher", "res8", "--teacher_ckpt", str(res8_teacher), "--dataset", str(micro_npz), "--epochs", "1",
              *FAST]
    train_heads.main([*common, "--out_dir", str(root / "heads")])
    test_dih.main(["--method", "kd", "--student", "res14", *common, "--out_dir", str(root / "ta")])
    found = {"teacher": res8_teacher, "heads": root / "heads" / "heads.pt", "assistant": root / "ta" / "student.pt"}
    for role, path in list(found.items()):
        found[f"{role} retrained"] = retrained(path, root / f"{role}-retrained.pt")
    return found


def retrained(path: Path, to: Path) -> Path:
    """The checkpoint at `path` with other weights (and their fingerprint), as if trained again: a copy to `to`."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {name: t + 1 if t.is_floating_point() else t for name, t in ckpt["state_dict"].items()}
    ckpt["fingerprint"] = fingerprint(ckpt["state_dict"])
    save_checkpoint(to, ckpt.pop("kind"), ckpt.pop("state_dict"), **{k: v for k, v in ckpt.items() if k != "format"})
    return to


def interrupted(out: Path) -> None:
    """A finished run made into one killed after its last epoch: last.pt is all that is left of it."""
    (out / "summary.json").unlink()
    (out / "student.pt").unlink()


@pytest.mark.parametrize(("method", "role", "flag"), [("kd", "teacher", "--teacher_ckpt"),
                                                      ("dih", "heads", "--heads_ckpt"),
                                                      ("takd", "assistant", "--ta_ckpt")])
def test_resume_refuses_a_network_changed_on_disk(networks, micro_npz, tmp_path, method, role, flag):
    """The teacher, heads or assistant a run started from, retrained in place: --resume refuses in one line
    rather than finish the run as a mixture of two."""
    file = tmp_path / "input" / networks[role].name
    file.parent.mkdir()
    shutil.copy(networks[role], file)
    argv = ["--method", method, "--teacher", "res8", "--dataset", str(micro_npz), "--epochs", "1",
            "--out_dir", str(tmp_path / "run"), *FAST, flag, str(file)]
    argv += [] if role == "teacher" else ["--teacher_ckpt", str(networks["teacher"])]
    argv += ["--ta", "res14"] if role == "assistant" else []
    summary = test_dih.main(argv)[method]
    recorded = {"teacher": "teacher_fingerprint", "heads": "heads_fingerprint", "assistant": "ta_fingerprint"}[role]
    assert summary[recorded] == torch.load(file, weights_only=True)["fingerprint"]
    interrupted(tmp_path / "run")
    shutil.copy(networks[f"{role} retrained"], file)
    with pytest.raises(UserError, match=f"--resume: the {role} this run started from has changed on disk \\({file}: "
                                        "fingerprint [0-9a-f]+ then, [0-9a-f]+ now; retrained in place\\?\\)"):
        test_dih.main([*argv, "--resume"])
    shutil.copy(networks[role], file)
    resumed = test_dih.main([*argv, "--resume"])[method]  # the original file resumes
    assert {**resumed, "wall_time_s": 0} == {**summary, "wall_time_s": 0}


def test_resume_keeps_the_memory_layout_the_run_started_with(micro_npz, tmp_path, monkeypatch):
    """channels_last follows the device, and the two layouts round differently: a run started where it is on
    (an AVX-512 CPU) and resumed where it would be off keeps it, and ends bit-identical to an undisturbed run."""
    def cpu(capability: str) -> None:
        monkeypatch.setattr(cli, "cpu_execution_inputs", lambda: {"native_bf16": False, "cpu_capability": capability})

    flags = ["--model", "res8", "--dataset", str(micro_npz), "--epochs", "2", "--amp", "off", *FAST]
    cpu("AVX512")
    train_teacher.main([*flags, "--out_dir", str(tmp_path / "whole")])
    save = engine.Run._save_progress

    def killed_after_the_first(run):
        save(run)
        raise KeyboardInterrupt  # as if killed right after epoch 1 was saved

    monkeypatch.setattr(engine.Run, "_save_progress", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        train_teacher.main([*flags, "--out_dir", str(tmp_path / "cut")])
    monkeypatch.setattr(engine.Run, "_save_progress", save)
    assert load_checkpoint(tmp_path / "cut" / "last.pt", "resume", "test")["channels_last"] is True

    cpu("DEFAULT")  # another machine (no AVX2: an ARM CPU, say), whose default layout is NCHW
    summary = train_teacher.main([*flags, "--out_dir", str(tmp_path / "cut"), "--resume"])
    assert summary["config"]["channels_last"] is True
    a, b = (torch.load(tmp_path / run / "teacher.pt", weights_only=True)["state_dict"] for run in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_without_its_last_checkpoint_is_finished(micro_npz, tmp_path, capsys):
    """summary.json and the final weights make a run finished: --resume does nothing, even with last.pt gone,
    and still refuses other arguments."""
    out = tmp_path / "run"
    flags = ["--model", "res8", "--dataset", str(micro_npz), "--epochs", "1", "--out_dir", str(out), *FAST]
    summary = train_teacher.main(flags)
    (out / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert train_teacher.main([*flags, "--resume"]) == json.loads(json.dumps(summary))
    assert "is already finished; nothing to do" in capsys.readouterr().out
    with pytest.raises(UserError, match="this run was started with lr=0.1, now 0.05"):
        train_teacher.main([*flags, "--resume", "--lr", "0.05"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "teacher.pt").unlink()
    with pytest.raises(UserError, match="holds summary.json but neither teacher.pt nor last.pt"):
        train_teacher.main([*flags, "--resume"])


def test_takd_looks_for_the_assistant_distilled_with_its_own_alpha_and_temperature(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(ta=None, ta_ckpt=None, teacher="res20", teacher_ckpt=None, dataset="synthetic",
                              seed=30, alpha=0.3, temperature=2.0)
    assistant = Path("runs", "synthetic", "student-res14-kd-res20-a0.3-t2-seed30", "student.pt")
    save_checkpoint(assistant, "student", {}, model="res14", teacher_fingerprint="f00d")
    assert read_assistant(args, {"fingerprint": "f00d", "path": "t.pt"})["path"] == str(assistant)
    args.alpha = 0.1  # KD's default: another assistant, not trained
    with pytest.raises(UserError, match="student-res14-kd-res20-a0.1-t2-seed30/student.pt.* --temperature=2$"):
        read_assistant(args, {"fingerprint": "f00d", "path": "t.pt"})
