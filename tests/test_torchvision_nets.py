"""torchvision's ImageNet models in the TapModel form: torchvision's function with torchvision's weights, BN folding
when frozen, and DIH's pooled heads (⚑) with the parameter counts they are designed to have."""

from __future__ import annotations

import pytest
import torch
import torchvision

import train_teacher
from checkpoint import load_checkpoint
from heads import heads_for
from importing import map_state
from models import build_model, count_batchnorms, fold_batchnorm
from utils import UserError

TORCHVISION_MODELS = ["resnet18", "resnet34", "resnet50", "mobilenet_v2"]


def torchvision_net(name: str, num_classes: int, seed: int) -> torch.nn.Module:
    """torchvision's own model with random weights and non-trivial BN statistics (one train-mode pass)."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    with torch.no_grad():
        net.train()(torch.randn(4, 3, 64, 64))
    return net.eval()


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_state_dicts_give_torchvisions_logits(name):
    """A state dict of torchvision's constructor, mapped by importing.py's key rules, makes our model compute
    torchvision's logits (eval mode, 64x64); the taps are the stages' outputs."""
    net = torchvision_net(name, 10, seed=1)
    ours = build_model(name, 10)
    ours.load_state_dict(map_state(ours, name, net.state_dict(), 10, "test"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, taps, _ = ours.eval().forward_features(x)
        torch.testing.assert_close(logits, net(x), rtol=1e-5, atol=1e-5)
        if name.startswith("resnet"):
            torch.testing.assert_close(taps[1], net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))


def test_same_seed_builds_torchvisions_initial_weights():
    """Built under one seed, our resnet18 starts from torchvision's initial weights (its constructor draws them)."""
    torch.manual_seed(5)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    torch.manual_seed(5)
    ours = build_model("resnet18", 10)
    mapped = map_state(ours, "resnet18", net.state_dict(), 10, "test")
    assert all(torch.equal(mapped[key], value) for key, value in ours.state_dict().items())


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_frozen_copies_fold_every_batchnorm(name):
    """Every BN of the bottleneck and inverted-residual blocks reads a convolution: all fold, same logits."""
    model = build_model(name, 10)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64))
    model.eval()
    folded = fold_batchnorm(model)
    assert count_batchnorms(model) > 0 and count_batchnorms(folded) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


# ⚑ Each tap pooled to the last tap's 7x7 grid at 224 pixels: Linear(C*49, classes) per tap (1000 classes).
HEAD_PARAMS_224 = {
    "resnet18": [64 * 49 * 1000 + 1000, 128 * 49 * 1000 + 1000, 256 * 49 * 1000 + 1000, 512 * 49 * 1000 + 1000],
    "mobilenet_v2": [24 * 49 * 1000 + 1000, 32 * 49 * 1000 + 1000, 96 * 49 * 1000 + 1000,
                     1280 * 49 * 1000 + 1000],
}


@pytest.mark.parametrize("name", list(HEAD_PARAMS_224))
def test_pooled_heads_parameters_at_224(name):
    with torch.device("meta"):
        teacher = build_model(name, 1000)
    teacher = teacher.to_empty(device="cpu")
    heads = heads_for(teacher, 1000, 224)
    assert heads.grid == (7, 7)
    assert [sum(p.numel() for p in head.parameters()) for head in heads.heads] == HEAD_PARAMS_224[name]
    logits = heads([torch.randn(1, *shape) for _, shape in heads.taps])
    assert [tuple(out.shape) for out in logits] == [(1, 1000)] * 4


def test_cifar_heads_stay_flatten_linear():
    """The paper's heads are untouched: no pooling for the CIFAR models."""
    heads = heads_for(build_model("res8", 10), 10)
    assert heads.grid is None and heads.heads[0].in_features == 16 * 32 * 32


def test_train_teacher_imports_a_torchvision_weight_file(tiny_npz, tmp_path):
    """`train_teacher.py --model resnet18 --import PATH` on a plain state dict as torchvision caches it: the run's
    teacher.pt holds weights that give torchvision's logits; a file of another torchvision model is refused."""
    net = torchvision_net("resnet18", 10, seed=3)
    torch.save(net.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    out = tmp_path / "teacher"
    train_teacher.main(["--model", "resnet18", "--import", str(tmp_path / "resnet18-f37072fd.pth"), "--dataset",
                        str(tiny_npz), "--gpu_id", "cpu", "--amp", "off", "--out_dir", str(out)])
    ckpt = load_checkpoint(out / "teacher.pt", "teacher", "test")
    model = build_model("resnet18", 10)
    model.load_state_dict(ckpt["state_dict"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), net(x), rtol=1e-5, atol=1e-5)

    torch.save(torchvision_net("resnet34", 10, seed=3).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(UserError, match=r"does not hold a resnet18: its tensor layer1\.2\.conv1\.weight has no place"):
        train_teacher.main(["--model", "resnet18", "--import", str(tmp_path / "resnet34.pth"), "--dataset",
                            str(tiny_npz), "--gpu_id", "cpu", "--out_dir", str(tmp_path / "other")])
