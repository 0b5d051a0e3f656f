"""MHKD: its loss against an independent float64 formula, the detached variant, a frozen teacher backbone that
stays bit-identical while its heads learn, the plain student checkpoint, refusals, resume.

MHKD's heads are costly (two 256-channel 3x3 convs on 32x32 maps, four heads): the runs here use a few
dozen images.
"""

import json
import math

import pytest
import torch
from conftest import Interrupted, assert_resumed, make_learnable, metrics_lines, stop_after_first_epoch

import engine
import students
import test_dih
import train_teacher
from checkpoint import load_checkpoint, load_weights
from data import load_dataset, save_npz
from engine import TrainConfig, fit
from methods import Setup, run_name
from methods.mhkd import MultiHeadDistillation, mhkd_loss
from models import build_model
from utils import UserError


def log_softmax(z):
    return z - torch.logsumexp(z, dim=1, keepdim=True)


def kd(s, t, y, alpha, tau):
    """(1−α)·CE(s, y) + α·τ²·KL(softmax(t/τ) ‖ softmax(s/τ)), KL summed over classes and averaged over the batch."""
    batch = len(y)
    ce = -log_softmax(s)[torch.arange(batch), y].mean()
    log_p, log_q = log_softmax(t / tau), log_softmax(s / tau)
    return (1 - alpha) * ce + alpha * tau**2 * (log_p.exp() * (log_p - log_q)).sum() / batch


def reference(s, t, hs, ht, y, alpha, tau, beta):
    """BASELINES.md's MHKD loss, by hand in float64."""
    s, t, hs, ht = s.double(), t.double(), [h.double() for h in hs], [h.double() for h in ht]
    total = kd(s, t, y, alpha, tau)
    for h_s, h_t in zip(hs, ht, strict=True):
        total = total - log_softmax(h_t)[torch.arange(len(y)), y].mean() + beta * kd(h_s, h_t, y, alpha, tau)
    return total


def logits(gen, n=5):
    return [torch.randn(8, 10, generator=gen) * 3 for _ in range(n)]


@pytest.mark.parametrize("alpha,tau,beta", [(0.1, 4.0, 0.5), (0.5, 1.0, 1.0), (0.0, 3.0, 0.0), (1.0, 6.0, 2.0)])
def test_mhkd_loss_matches_formula(alpha, tau, beta):
    gen = torch.Generator().manual_seed(int(10 * tau))
    s, t, hs1, hs2, ht1 = logits(gen)
    ht2 = torch.randn(8, 10, generator=gen) * 3
    y = torch.randint(0, 10, (8,), generator=gen)
    want = reference(s, t, [hs1, hs2], [ht1, ht2], y, alpha, tau, beta)
    for detach in (False, True):  # the same value; only the gradients differ
        got = mhkd_loss(s, t, [hs1, hs2], [ht1, ht2], y, alpha, tau, beta, detach)
        assert got.dtype == torch.float32 and math.isclose(got.item(), want.item(), rel_tol=1e-5)


def test_detach_keeps_the_head_kd_term_off_the_teacher_heads():
    gen = torch.Generator().manual_seed(0)
    s, t, hs1, hs2, ht1 = logits(gen)
    ht2 = torch.randn(8, 10, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    grads = {}
    for detach in (False, True):
        heads = [ht1.clone().double().requires_grad_(), ht2.clone().double().requires_grad_()]
        mhkd_loss(s.double(), t.double(), [hs1.double(), hs2.double()], heads, y, 0.1, 4.0, 0.5, detach).backward()
        grads[detach] = [h.grad for h in heads]
    for i, h_t in enumerate((ht1, ht2)):  # detached: the teacher heads' own CE only, (softmax − one-hot)/B
        ce_only = (torch.softmax(h_t.double(), 1) - torch.nn.functional.one_hot(y, 10)) / 8
        assert torch.allclose(grads[True][i], ce_only)
        assert not torch.allclose(grads[False][i], ce_only)  # the original: the KD term pulls them too


def test_mhkd_learns_and_the_teacher_backbone_stays_bit_identical(tmp_path):
    npz = tmp_path / "learnable.npz"
    save_npz(npz, *make_learnable(80, 50))
    common = ["--dataset", str(npz), "--gpu_id", "cpu", "--batch_size", "16", "--lr", "0.05"]
    train_teacher.main(["--model", "res8", "--epochs", "1", "--out_dir", str(tmp_path / "t"), *common])
    data = load_dataset(str(npz), "unused", torch.device("cpu"))
    teacher = build_model("res8", 10)
    load_weights(teacher, load_checkpoint(tmp_path / "t" / "teacher.pt", "teacher", "t"), "t")
    teacher.train()  # the stage must freeze it itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    setup = Setup(student=build_model("res8", 10), teacher=teacher, data=data, meta={},
                  hyper={"alpha": 0.1, "temperature": 4.0, "beta": 0.5, "detach": False})
    stage = MultiHeadDistillation(setup)
    heads_before = {k: v.clone() for k, v in stage.teacher_heads.state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, wd=5e-4, nesterov=True, schedule=(1,),
                      gamma=0.1, seed=0)
    summary = fit(stage, data, cfg, tmp_path / "s", {})
    assert summary["final_test_acc"] > 40.0  # chance: 10%
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running statistics
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    heads_after = stage.teacher_heads.state_dict()
    assert not any(torch.equal(heads_before[k], heads_after[k]) for k in heads_before if k.endswith("weight"))
    by_output = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[-1])["test_acc_by_output"]
    assert set(by_output) == {"model", "student_head_layer1", "student_head_layer2", "teacher_head_layer1",
                              "teacher_head_layer2"}


def test_cli_run_resume_and_refusals(tmp_path, monkeypatch, capsys):
    """Through test_dih.py on 32 images: the plain student checkpoint, the heads apart, exact resume."""
    npz = tmp_path / "micro.npz"
    save_npz(npz, *make_learnable(32, 20))
    common = ["--dataset", str(npz), "--gpu_id", "cpu", "--batch_size", "16"]
    train_teacher.main(["--model", "res8", "--epochs", "1", "--out_dir", str(tmp_path / "t"), *common])

    def student(out: str, *flags: str) -> dict:
        return test_dih.main(["--method", "mhkd", "--teacher", "res8", "--teacher_ckpt",
                              str(tmp_path / "t" / "teacher.pt"), "--epochs", "2", "--out_dir", str(tmp_path / out),
                              *common, *flags])["mhkd"]

    summary = student("whole", "--detach")
    assert summary["method"] == "mhkd" and summary["detach"] is True
    assert (summary["alpha"], summary["temperature"], summary["beta"]) == (0.1, 4.0, 0.5)
    assert run_name("res8", "mhkd", "res110", {"detach": True}) == "student-res8-mhkd-res110-a0.1-t4-b0.5-detach"
    load_weights(build_model("res8", 10), load_checkpoint(tmp_path / "whole" / "student.pt", "student", "s"), "s")
    extras = load_checkpoint(tmp_path / "whole" / "extras.pt", "extras", "s")
    assert extras["modules"] == ["student_heads", "teacher_heads"]

    with monkeypatch.context() as patch:
        patch.setattr(students, "fit_group", lambda *args, **kw: engine.fit_group(*args, **kw,
                                                                                 log=stop_after_first_epoch))
        with pytest.raises(Interrupted):
            student("cut", "--detach")
    before = metrics_lines(tmp_path / "cut")
    capsys.readouterr()
    student("cut", "--detach", "--resume")
    assert_resumed(tmp_path / "cut", before, capsys.readouterr().out)
    for name in ("student.pt", "extras.pt"):
        a, b = (torch.load(tmp_path / run / name, weights_only=True)["state_dict"] for run in ("whole", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    for flags, fragment in [(["--orth", "0.1"], "--orth makes no sense with --method mhkd"),
                            (["--beta", "-1"], "--beta must be non-negative"),
                            (["--heads_ckpt", "x.pt"], "--heads_ckpt makes no sense")]:
        with pytest.raises(UserError, match=fragment):
            student("refused", *flags)
    assert not (tmp_path / "refused").exists()
