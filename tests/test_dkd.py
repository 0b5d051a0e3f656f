"""DKD: its loss against the formula in float64 and against KD's decomposition, the warm-up by epoch, the step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import repdistiller_checkpoint

import test_dih
import train_teacher
from data import Batch, from_arrays
from methods import METHODS, Setup
from methods.dkd import dkd_loss, warmup_weight
from models import build_model
from utils import UserError


def reference_parts(s: list[float], t: list[float], y: int, temperature: float) -> tuple[float, float, float]:
    """(TCKD, NCKD, KL) of one sample in float64 from the definitions, without the T² factor: the target class
    against the rest, then a softmax over the non-target classes alone (the target dropped, not masked)."""
    def softmax(z: list[float]) -> list[float]:
        top = max(z)
        e = [math.exp((v - top) / temperature) for v in z]
        return [v / sum(e) for v in e]

    p, q = softmax(t), softmax(s)
    tckd = p[y] * math.log(p[y] / q[y]) + (1 - p[y]) * math.log((1 - p[y]) / (1 - q[y]))
    rest = [j for j in range(len(s)) if j != y]
    p_hat, q_hat = softmax([t[j] for j in rest]), softmax([s[j] for j in rest])
    nckd = sum(a * math.log(a / b) for a, b in zip(p_hat, q_hat, strict=True))
    kl = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    return tckd, nckd, kl


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dkd_loss_against_the_formula_in_float64(dtype):
    gen = torch.Generator().manual_seed(0)
    student, teacher = 3 * torch.randn(6, 7, generator=gen), 3 * torch.randn(6, 7, generator=gen)
    target = torch.tensor([0, 3, 6, 2, 2, 5])
    alpha, beta, temperature = 1.0, 8.0, 4.0
    parts = [reference_parts(student[i].tolist(), teacher[i].tolist(), int(target[i]), temperature) for i in range(6)]
    tckd, nckd = (sum(p[k] for p in parts) / 6 for k in (0, 1))
    expected = temperature**2 * (alpha * tckd + beta * nckd)
    got = dkd_loss(student.to(dtype), teacher.to(dtype), target, alpha, beta, temperature)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert float(got) == pytest.approx(expected, rel=1e-10 if dtype == torch.float64 else 1e-5)
    # Each part on its own: α alone weighs TCKD, β alone NCKD.
    assert float(dkd_loss(student.double(), teacher.double(), target, 1.0, 0.0, 2.0)) == pytest.approx(
        4 * sum(reference_parts(student[i].tolist(), teacher[i].tolist(), int(target[i]), 2.0)[0]
                for i in range(6)) / 6, rel=1e-10)


def test_kd_is_tckd_plus_non_target_mass_times_nckd():
    """The DKD paper's decomposition, per sample: KL(p‖q) = TCKD + (1 − p_y)·NCKD (a batch of one)."""
    gen = torch.Generator().manual_seed(1)
    s, t = (torch.randn(1, 10, generator=gen, dtype=torch.float64) for _ in range(2))
    y = torch.tensor([4])
    non_target = 1 - float(F.softmax(t / 4, dim=1)[0, 4])
    kl = F.kl_div(F.log_softmax(s / 4, dim=1), F.softmax(t / 4, dim=1), reduction="batchmean")
    tckd = dkd_loss(s, t, y, 1.0, 0.0, 4.0) / 16
    nckd = dkd_loss(s, t, y, 0.0, 1.0, 4.0) / 16
    assert float(kl) == pytest.approx(float(tckd + non_target * nckd), rel=1e-10)


def test_warmup_is_linear_over_the_first_epochs_counted_from_one():
    assert [warmup_weight(e, 20) for e in (1, 10, 19, 20, 21, 240)] == [0.05, 0.5, 0.95, 1.0, 1.0, 1.0]
    assert warmup_weight(1, 1) == 1.0


def test_the_training_step_is_ce_plus_the_warmed_up_dkd_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    y = np.arange(8) % 4
    data = from_arrays(x, y, x, y, torch.device("cpu"))
    student, teacher = build_model("res8", 4).eval(), build_model("res8", 4).eval().requires_grad_(False)
    hyper = dict(METHODS["dkd"].defaults, beta=2.0)
    stage = METHODS["dkd"].build(Setup(student=student, teacher=teacher, hyper=hyper, data=data, meta={}))
    batch = Batch(data.x_test[:8].float() / 255, data.y_test[:8], torch.arange(8))
    with torch.no_grad():
        s, t = student(batch.x), teacher(batch.x)
        kd = dkd_loss(s, t, batch.y, 1.0, 2.0, 4.0)
        for epoch, weight in ((1, 0.05), (7, 0.35), (30, 1.0)):
            stage.start_epoch(epoch)
            loss, (logits,) = stage.training_loss(batch)
            assert float(loss) == pytest.approx(float(F.cross_entropy(s, batch.y) + weight * kd), rel=1e-6)
            assert torch.equal(logits, s)


def test_dkd_flags_belong_to_dkd_only():
    with pytest.raises(UserError, match="--warmup makes no sense with --method kd"):
        test_dih.main(["--method", "kd", "--warmup", "5", "--dataset", "synthetic"])
    with pytest.raises(UserError, match="--warmup must be at least 1"):
        test_dih.main(["--method", "dkd", "--warmup", "0", "--dataset", "synthetic"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run by make gpu-check")
def test_the_warmup_reaches_a_graphed_step_on_cuda(tiny_npz, tmp_path):
    """Through the warm-up (weights 1/3, 2/3, 1), each epoch's loss with CUDA graphs as eager gives it: the weight
    is a device tensor updated in place, which a replayed graph reads. The teacher: a RepDistiller checkpoint
    imported on the GPU."""
    checkpoint = tmp_path / "resnet8.pth"
    repdistiller_checkpoint(checkpoint, "resnet8", 10)
    common = ["--dataset", str(tiny_npz), "--gpu_id", "0", "--amp", "off"]
    train_teacher.main(["--model", "res8", "--import", str(checkpoint), *common, "--out_dir", str(tmp_path / "t")])
    runs = {}
    for mode in ("graphs", "off"):
        test_dih.main(["--method", "dkd", "--student", "res8", "--teacher", "res8", "--teacher_ckpt",
                       str(tmp_path / "t" / "teacher.pt"), "--warmup", "3", "--epochs", "3", "--batch_size", "100",
                       "--compile", mode, *common, "--out_dir", str(tmp_path / mode)])
        runs[mode] = [json.loads(line)["train_loss"] for line in (tmp_path / mode / "metrics.jsonl").open()]
    assert runs["graphs"] == pytest.approx(runs["off"], rel=1e-3)
