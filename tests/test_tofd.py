"""TOFD: its teacher, its loss against an independent float64 formula, pairing by stage, refusals, resume."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    Interrupted,
    assert_clean_failure,
    assert_resumed,
    metrics_lines,
    run_script,
    stop_after_first_epoch,
)
from torch import nn

import engine
import students
import test_dih
import train_teacher
from checkpoint import load_checkpoint, load_weights
from data import Batch, load_dataset
from heads import tofd_aux_for
from methods import Setup
from methods.tofd import TaskOrientedDistillation, tofd_loss, tofd_temperature
from models import build_model
from utils import UserError

FAST = ["--gpu_id", "cpu", "--batch_size", "64"]


def log_softmax(z):
    return z - torch.logsumexp(z, dim=1, keepdim=True)


def frobenius(m):
    return (m**2).sum().sqrt()


def reference(zs, zt, fs, ft, ws, y, temperature, beta, orth):
    """BASELINES.md's TOFD loss written out by hand in float64, pairs given in stage order."""
    total = torch.zeros((), dtype=torch.float64)
    batch = len(y)
    for z_s, z_t, f_s, f_t, w in zip(zs, zt, fs, ft, ws, strict=True):
        z_s, z_t, f_s, f_t, w = (v.double() for v in (z_s, z_t, f_s, f_t, w))
        total = total + beta * frobenius(f_s @ w.T - f_t)
        total = total - log_softmax(z_s)[torch.arange(batch), y].mean()
        total = total - (log_softmax(z_t / temperature).exp() * log_softmax(z_s / temperature)).sum() / batch
        total = total + orth * (frobenius(w @ w.T - torch.eye(w.shape[0], dtype=torch.float64))
                                + frobenius(w.T @ w - torch.eye(w.shape[1], dtype=torch.float64)))
    return total


def test_epoch_temperature():
    """T_e = 1 + 3·e/250 at 1-based epoch e: the original's `1 + (3/250)·(1 + epoch)` with its 0-based epoch."""
    assert [tofd_temperature(e) for e in (1, 100, 200, 250)] == pytest.approx([1.012, 2.2, 3.4, 4.0])


@pytest.mark.parametrize("beta,orth,epoch", [(0.05, 0.03, 1), (0.05, 0.03, 200), (1.0, 0.0, 50), (0.0, 2.0, 250)])
def test_tofd_loss_matches_formula(beta, orth, epoch):
    gen = torch.Generator().manual_seed(epoch)
    dims = [(16, 32), (32, 32), (64, 128)]  # (d_s, d_t) per pair: links need not be square
    zs = [torch.randn(8, 10, generator=gen) * 3 for _ in dims]
    zt = [torch.randn(8, 10, generator=gen) * 3 for _ in dims]
    fs = [torch.randn(8, d_s, generator=gen) for d_s, _ in dims]
    ft = [torch.randn(8, d_t, generator=gen) for _, d_t in dims]
    ws = [torch.randn(d_t, d_s, generator=gen) * 0.2 for d_s, d_t in dims]
    y = torch.randint(0, 10, (8,), generator=gen)
    temperature = tofd_temperature(epoch)
    want = reference(zs, zt, fs, ft, ws, y, temperature, beta, orth)
    got = tofd_loss(zs, zt, fs, ft, ws, y, torch.tensor(temperature), beta, orth)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5)
    exact = tofd_loss(*[[v.double() for v in group] for group in (zs, zt, fs, ft, ws)], y, temperature, beta, orth)
    assert exact.dtype == torch.float64 and math.isclose(exact.item(), want.item(), rel_tol=1e-12)


def test_student_pairs_classifiers_by_stage(tiny_npz):
    """A res8 student of a 4-tap ResNet-18 TOFD teacher: aux_1 ↔ aux_1, aux_2 ↔ aux_2, main ↔ main; the
    teacher's aux_3 has no partner. The original zipped [main, aux3, aux2, aux1] logits with [f3, f2, f1]."""
    torch.manual_seed(0)
    data = load_dataset(str(tiny_npz), "unused", torch.device("cpu"))
    teacher, student = build_model("res18", 10), build_model("res8", 10)
    teacher_aux = tofd_aux_for(teacher, 10)
    extras = {"state_dict": nn.ModuleDict({"aux": teacher_aux}).state_dict()}
    teacher.train()  # the stage must freeze it itself
    setup = Setup(student=student, teacher=teacher, hyper={"beta": 0.05, "orth": 0.03}, data=data, meta={},
                  teacher_ckpt={"extras": extras, "path": "teacher.pt"})
    stage = TaskOrientedDistillation(setup)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert stage.aux.tap_names == ("layer1", "layer2")
    assert [(link.in_features, link.out_features) for link in stage.links] == [(64, 512)] * 3
    stage.trainable.eval()  # batch statistics aside, so that the reference below sees the same outputs
    teacher_aux.eval()
    stage.start_epoch(100)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss, _ = stage.training_loss(Batch(x, y, torch.arange(8)))

    with torch.no_grad():
        s, t = student.forward_features(x), teacher.forward_features(x)
        zs, fs, zt, ft = [], [], [], []
        for i in range(2):  # by stage, module by module
            for aux, taps, z, f in ((stage.aux, s.taps, zs, fs), (teacher_aux, t.taps, zt, ft)):
                logits, pooled = aux.classifiers[i](taps[i])
                z.append(logits)
                f.append(pooled)
        zs.append(s.logits)
        fs.append(s.pooled)
        zt.append(t.logits)
        ft.append(t.pooled)
        ws = [link.weight for link in stage.links]
        want = reference(zs, zt, fs, ft, ws, y, 2.2, 0.05, 0.03)
        assert math.isclose(loss.item(), want.item(), rel_tol=1e-5)
        misaligned = reference(zs[::-1], zt[::-1], fs[::-1], ft[::-1], ws, y, 2.2, 0.05, 0.03)
        assert not math.isclose(misaligned.item(), want.item(), rel_tol=1e-3)
        stage.start_epoch(1)  # the temperature follows the epoch
        assert math.isclose(stage.training_loss(Batch(x, y, torch.arange(8)))[0].item(),
                            reference(zs, zt, fs, ft, ws, y, 1.012, 0.05, 0.03).item(), rel_tol=1e-5)


@pytest.fixture(scope="module")
def tofd_teachers(tiny_npz, tmp_path_factory) -> dict[str, Path]:
    """Two res8 TOFD teachers (seeds 30 and 31) and a plain one, each trained for one epoch."""
    root = tmp_path_factory.mktemp("tofd")
    common = ["--model", "res8", "--dataset", str(tiny_npz), "--epochs", "1", *FAST]
    train_teacher.main([*common, "--tofd", "--out_dir", str(root / "a")])
    train_teacher.main([*common, "--tofd", "--seed", "31", "--out_dir", str(root / "b")])
    train_teacher.main([*common, "--out_dir", str(root / "plain")])
    return {name: root / name / "teacher.pt" for name in ("a", "b", "plain")}


def test_tofd_teacher_is_the_plain_model_with_its_classifiers_apart(tofd_teachers):
    folder = tofd_teachers["a"].parent
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["variant"] == "tofd" and summary["extras"] == "extras.pt"
    assert [c["tap"] for c in summary["aux_classifiers"]] == ["layer1", "layer2"]
    metrics = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(metrics["test_acc_by_output"]) == {"model", "layer1", "layer2"}
    assert summary["final_test_acc"] == metrics["test_acc_by_output"]["model"]
    assert [c["final_test_acc"] for c in summary["aux_classifiers"]] == [metrics["test_acc_by_output"][t]
                                                                         for t in ("layer1", "layer2")]
    ckpt = load_checkpoint(folder / "teacher.pt", "teacher", "t")
    assert ckpt["variant"] == "tofd" and ckpt["aux_taps"] == ["layer1", "layer2"]
    load_weights(build_model("res8", 10), ckpt, "t")  # strictly: the plain model, nothing else
    extras = load_checkpoint(folder / "extras.pt", "extras", "t")
    assert extras["model_fingerprint"] == ckpt["fingerprint"] and extras["modules"] == ["aux"]


def student(npz: Path, out: Path, *flags: str) -> dict:
    return test_dih.main(["--method", "tofd", "--teacher", "res8", "--dataset", str(npz), "--epochs", "1",
                          "--out_dir", str(out), *FAST, *flags])["tofd"]


def test_student_checkpoint_is_the_plain_student(tofd_teachers, tiny_npz, tmp_path):
    summary = student(tiny_npz, tmp_path, "--teacher_ckpt", str(tofd_teachers["a"]))
    assert summary["method"] == "tofd" and summary["beta"] == 0.05 and summary["orth"] == 0.03
    assert summary["alpha"] is None and summary["temperature"] is None  # TOFD has neither
    load_weights(build_model("res8", 10), load_checkpoint(tmp_path / "student.pt", "student", "s"), "s")
    extras = load_checkpoint(tmp_path / "extras.pt", "extras", "s")
    assert extras["modules"] == ["aux", "links"]
    assert {key.split(".")[0] for key in extras["state_dict"]} == {"aux", "links"}
    # A plain method takes a TOFD teacher.pt for the plain model it holds.
    kd = test_dih.main(["--method", "kd", "--teacher", "res8", "--teacher_ckpt", str(tofd_teachers["a"]),
                        "--dataset", str(tiny_npz), "--epochs", "1", "--out_dir", str(tmp_path / "kd"), *FAST])["kd"]
    assert kd["teacher_fingerprint"] == summary["teacher_fingerprint"]


def test_default_folders(tiny_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_npz, "tiny.npz")
    train_teacher.main(["--model", "res8", "--tofd", "--dataset", "tiny.npz", "--epochs", "1", *FAST])
    test_dih.main(["--method", "tofd", "--teacher", "res8", "--dataset", "tiny.npz", "--epochs", "1", *FAST])
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == [
        "student-res8-tofd-res8-b0.05-seed30", "teacher-res8-tofd-seed30"]


def test_refusals(tofd_teachers, tiny_npz, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tofd_teachers["a"], lone / "teacher.pt")
    swapped = tmp_path / "swapped"
    shutil.copytree(tofd_teachers["a"].parent, swapped)
    shutil.copy(tofd_teachers["b"].parent / "extras.pt", swapped / "extras.pt")
    cases = [
        (["--teacher_ckpt", str(tofd_teachers["plain"])],
         "holds a plain teacher, but this run needs a tofd teacher; train it with: python3 train_teacher.py --model "
         "res8 --tofd"),
        (["--teacher_ckpt", str(lone / "teacher.pt")], "no checkpoint at .*lone/extras.pt"),
        (["--teacher_ckpt", str(swapped / "teacher.pt")], "belongs to other weights"),
        (["--teacher_ckpt", str(tofd_teachers["a"]), "--alpha", "0.5"], "--alpha makes no sense with --method tofd"),
        (["--teacher_ckpt", str(tofd_teachers["a"]), "--temperature", "4"], "--temperature makes no sense"),
        (["--teacher_ckpt", str(tofd_teachers["a"]), "--orth", "-1"], "--orth must be non-negative"),
    ]
    for flags, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            student(tiny_npz, tmp_path / "s", *flags)
        assert not (tmp_path / "s").exists()
    result = run_script("test_dih.py", "--method", "tofd", "--teacher", "res8", "--teacher_ckpt",
                        str(tofd_teachers["plain"]), "--dataset", str(tiny_npz), "--gpu_id", "cpu")
    assert_clean_failure(result, "holds a plain teacher", "--tofd")


def test_resume_is_exact(tofd_teachers, tiny_npz, tmp_path, monkeypatch, capsys):
    """Cut after epoch 1 of 3, resumed: bit-identical, the epoch temperature included (it changes each epoch)."""
    flags = ["--teacher_ckpt", str(tofd_teachers["a"]), "--epochs", "3", "--schedule", "2"]
    student(tiny_npz, tmp_path / "whole", *flags)
    with monkeypatch.context() as patch:
        patch.setattr(students, "fit_group", lambda *args, **kw: engine.fit_group(*args, **kw,
                                                                                 log=stop_after_first_epoch))
        with pytest.raises(Interrupted):
            student(tiny_npz, tmp_path / "cut", *flags)
    assert not (tmp_path / "cut" / "summary.json").exists()
    before = metrics_lines(tmp_path / "cut")
    capsys.readouterr()
    student(tiny_npz, tmp_path / "cut", *flags, "--resume")
    assert_resumed(tmp_path / "cut", before, capsys.readouterr().out)
    for name in ("student.pt", "extras.pt"):
        a, b = (torch.load(tmp_path / run / name, weights_only=True)["state_dict"] for run in ("whole", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("whole", "cut")]
    assert rows[0] == rows[1] and len(rows[0]) == 3


def test_tofd_learns(learnable_npz, tmp_path):
    common = ["--dataset", str(learnable_npz), "--batch_size", "16", "--lr", "0.05", "--schedule", "1",
              "--gpu_id", "cpu"]
    train_teacher.main(["--model", "res8", "--tofd", "--epochs", "1", "--out_dir", str(tmp_path / "t"), *common])
    summary = test_dih.main(["--method", "tofd", "--teacher", "res8", "--teacher_ckpt",
                             str(tmp_path / "t" / "teacher.pt"), "--epochs", "2", "--out_dir", str(tmp_path / "s"),
                             *common])["tofd"]
    assert summary["final_test_acc"] > 40.0  # chance: 10%
