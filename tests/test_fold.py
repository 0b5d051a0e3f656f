"""Frozen networks with their batch norms folded: the same outputs as the original for every model family, only
the legal pairs folded, nothing trainable, and every stage's frozen teacher running folded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import students
import test_dih
import train_heads
import train_teacher
from checkpoint import model_fingerprint
from data import Batch, load_dataset, make_synthetic, save_npz
from heads import tofd_aux_for
from methods import Setup
from methods.tofd import TaskOrientedDistillation
from models import build_model, count_batchnorms, fold_batchnorm
from models.wrn import WideResNet

FAST = ["--gpu_id", "cpu", "--batch_size", "32"]
# BNs left after folding. WRN's pre-activation BNs read a sum (the previous block's output), never a conv's:
# wrn_16_2 keeps 5 of its 6 blocks' first BN and the final BN (the first block's BN reads the stem's conv, whose
# output nothing else reads: the block's shortcut is a projection of the normalised input). wrn_10_1's first block
# has an identity shortcut, which reads the stem's output too: that BN must stay (4 left: 3 blocks' first + final).
# Every BN of RepDistiller's cross-architecture models folds: ResNet-50's Bottlenecks, MobileNetV2's inverted
# residuals (conv-BN throughout), the ShuffleNets' blocks (their shuffle and split are traced, not opaque).
FAMILIES = {"res8": 0, "res18": 0, "vgg11": 0, "wrn_16_2": 6, "wrn_10_1": 4, "res50": 0, "mobilenetv2": 0,
            "shufflev1": 0, "shufflev2": 0}


def randomise_batchnorms(module: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters far from their initial values, so that folding is not a no-op."""
    gen = torch.Generator().manual_seed(seed)
    for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        shape = bn.running_mean.shape
        with torch.no_grad():
            bn.running_mean.copy_(torch.rand(shape, generator=gen) - 0.5)
            bn.running_var.copy_(torch.rand(shape, generator=gen) * 1.5 + 0.5)
            bn.weight.copy_(torch.rand(shape, generator=gen) + 0.5)
            bn.bias.copy_(torch.rand(shape, generator=gen) * 0.6 - 0.3)


def model(name: str) -> nn.Module:
    torch.manual_seed(0)
    net = WideResNet(10, 1, num_classes=10) if name == "wrn_10_1" else build_model(name, 10)
    randomise_batchnorms(net)
    return net.eval()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_folded_network_computes_what_the_original_does(name, channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    original = model(name).to(memory_format=memory_format)
    state = {k: v.clone() for k, v in original.state_dict().items()}
    fingerprint = model_fingerprint(original)
    folded = fold_batchnorm(original)
    assert count_batchnorms(original) > 0 and count_batchnorms(folded) == FAMILIES[name]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(memory_format=memory_format)
    with torch.no_grad():
        want, got = original.forward_features(x), folded.forward_features(x)
    for a, b in zip([want.logits, *want.taps, want.pooled], [got.logits, *got.taps, got.pooled], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    # A copy: the original (its weights, BN statistics, fingerprint) is untouched.
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in state.items())
    assert model_fingerprint(original) == fingerprint
    for conv in (m for m in folded.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)):
        assert conv.weight.is_contiguous(memory_format=memory_format)


def test_tofd_auxiliary_classifiers_fold_child_by_child():
    """Their forward takes a list of taps, which fx cannot trace: each classifier is folded on its own."""
    torch.manual_seed(0)
    aux = tofd_aux_for(build_model("res8", 10), 10)
    randomise_batchnorms(aux)
    aux.eval()
    folded = fold_batchnorm(aux)
    assert count_batchnorms(aux) == 6 and count_batchnorms(folded) == 0
    taps = [torch.randn(2, c, s, s) for c, s in ((16, 32), (32, 16))]
    with torch.no_grad():
        for want, got in zip(aux(taps), folded(taps), strict=True):
            for a, b in zip(want, got, strict=True):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_nothing_trains_through_a_folded_network():
    original = model("res8").train()
    folded = fold_batchnorm(original)
    assert original.training and all(p.requires_grad for p in original.parameters())  # left as it was
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    features = folded.forward_features(x)
    features.logits.sum().backward()  # gradients reach the input, none lands on the folded weights
    assert x.grad is not None and all(p.grad is None for p in folded.parameters())
    # A step in train mode cannot move it either: no BN is left to update its statistics.
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    folded.train()
    with torch.no_grad():
        folded(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(v, folded.state_dict()[k]) for k, v in before.items())


class Built(Exception):
    """Raised in place of training: the stage as the script built it."""


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> tuple[Path, Path]:
    """A res8 teacher, one epoch on 64 images, and its npz."""
    root = tmp_path_factory.mktemp("fold")
    save_npz(root / "micro.npz", *make_synthetic(64, 32, seed=0))
    train_teacher.main(["--model", "res8", "--dataset", str(root / "micro.npz"), "--epochs", "1", "--out_dir",
                        str(root / "t"), *FAST])
    return root / "t" / "teacher.pt", root / "micro.npz"


def built_stage(monkeypatch, script, argv: list[str]):
    """The stage `script.main(argv)` would train."""
    stages = []

    def capture(stage, *args, **kwargs):
        stages.append(stage)
        raise Built

    def capture_group(runs, *args, **kwargs):
        capture(runs[0].stage)

    if script is test_dih:  # its students train in students.py
        monkeypatch.setattr(students, "fit_group", capture_group)
    else:
        monkeypatch.setattr(script, "fit", capture)
    with pytest.raises(Built):
        script.main(argv)
    return stages[0]


def test_every_frozen_teacher_runs_folded(teacher_ckpt, tmp_path, monkeypatch):
    ckpt, npz = teacher_ckpt
    common = ["--teacher", "res8", "--teacher_ckpt", str(ckpt), "--dataset", str(npz), *FAST]
    for method in ("kd", "mhkd", "crd"):
        stage = built_stage(monkeypatch, test_dih, ["--method", method, *common, "--out_dir", str(tmp_path / method)])
        assert count_batchnorms(stage.shared_pass.teacher) == 0, method
        assert not any(p.requires_grad for p in stage.shared_pass.teacher.parameters())

    # Stage 2 trains on the folded copy and evaluates the teacher as it is: its classifier's accuracy is stage
    # 1's to the last image (SPEC), not up to rounding.
    stage = built_stage(monkeypatch, train_heads, [*common, "--out_dir", str(tmp_path / "heads")])
    assert count_batchnorms(stage.teacher) == 9 and count_batchnorms(stage.folded_teacher) == 0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(stage.evaluate(x)["final"], stage.teacher(x))
        assert not torch.equal(stage.folded_teacher(x), stage.teacher(x))  # rounding differs: the check can fail


def test_tofd_teacher_classifiers_run_folded(tiny_npz):
    data = load_dataset(str(tiny_npz), "unused", torch.device("cpu"))
    teacher = build_model("res8", 10)
    extras = {"state_dict": nn.ModuleDict({"aux": tofd_aux_for(teacher, 10)}).state_dict()}
    setup = Setup(student=build_model("res8", 10), teacher=fold_batchnorm(teacher), hyper={"beta": 0.05, "orth": 0.03},
                  data=data, meta={}, teacher_ckpt={"extras": extras, "path": "teacher.pt"})
    stage = TaskOrientedDistillation(setup)
    assert count_batchnorms(stage.teacher_aux) == 0
    assert count_batchnorms(stage.aux) == 6  # the student's own classifiers train: left as they are
    loss, _ = stage.training_loss(Batch(torch.randn(4, 3, 32, 32), data.y_train[:4], torch.arange(4)))
    assert torch.isfinite(loss)
