"""train_teacher.py --import: RepDistiller/mdistiller checkpoints and the DIH authors' state dicts, built here from
their key names and shapes (tests/foreign_layouts.py), load weight for weight into our models; everything else is
refused in one line; the run folder is an ordinary teacher's."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure, run_script
from foreign_layouts import (
    dih_resnet18_shapes,
    random_state,
    reference_logits,
    repdistiller_shapes,
    without_buffers_named,
)
from helpers import repdistiller_checkpoint

import train_teacher
from checkpoint import load_checkpoint, model_fingerprint
from data import load_dataset, test_batches
from importing import map_state, read_foreign
from models import REPDISTILLER_NAMES, build_model
from utils import UserError


def imported(ours: str, path: Path, classes: int) -> torch.nn.Module:
    model = build_model(ours, classes)
    model.load_state_dict(map_state(model, ours, read_foreign(path).state, classes, str(path)))
    return model.eval()


@pytest.mark.parametrize(("ours", "size"), [("res8x4", 32), ("wrn_40_1", 32), ("vgg13", 32), ("vgg8", 64),
                                            ("res50", 32), ("mobilenetv2", 32), ("shufflev1", 32), ("shufflev2", 32)])
def test_repdistiller_checkpoints_load_weight_for_weight(tmp_path, ours, size):
    """Our model with the imported weights computes what RepDistiller's forward pass computes from the file's keys
    (a tensor in the wrong place, even one of the right shape, would change the logits)."""
    theirs = REPDISTILLER_NAMES[ours]
    state = repdistiller_checkpoint(tmp_path / "ckpt_epoch_240.pth", theirs, 100)
    model = imported(ours, tmp_path / "ckpt_epoch_240.pth", 100)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(theirs, state, x), rtol=1e-4, atol=1e-4)


def test_the_dih_authors_state_dicts_load_by_name(tmp_path):
    """Their CIFAR ResNets (RepDistiller's names), saved from DataParallel (`module.`) by a PyTorch that wrote no
    num_batches_tracked; and their ResNet-18 (`shortcut`, `linear`)."""
    state = random_state(repdistiller_shapes("resnet20", 10), seed=3)
    saved = without_buffers_named(state, r"num_batches_tracked$")
    torch.save({f"module.{key}": value for key, value in saved.items()}, tmp_path / "res20.pth")
    foreign = read_foreign(tmp_path / "res20.pth")
    assert foreign.layout == "state_dict" and foreign.epoch is None and foreign.accuracy is None
    model = imported("res20", tmp_path / "res20.pth", 10)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits("resnet20", state, x), rtol=1e-4, atol=1e-4)
    assert int(model.state_dict()["stem.1.num_batches_tracked"]) == 0

    state = random_state(dih_resnet18_shapes(10), seed=4)
    model = build_model("res18", 10)
    mapped = map_state(model, "res18", state, 10, "res18.pth")
    for ours, theirs in [("stem.0.weight", "conv1.weight"), ("stages.3.1.conv2.weight", "layer4.1.conv2.weight"),
                         ("stages.1.0.shortcut.1.running_var", "layer2.0.shortcut.1.running_var"),
                         ("classifier.weight", "linear.weight")]:
        assert torch.equal(mapped[ours], state[theirs])


def test_another_architecture_or_class_count_is_refused(tmp_path):
    repdistiller_checkpoint(tmp_path / "res56.pth", "resnet56", 100)
    repdistiller_checkpoint(tmp_path / "wrn.pth", "wrn_40_1", 100)
    res56 = read_foreign(tmp_path / "res56.pth").state
    with pytest.raises(UserError, match=r"does not hold a res110: 270 of its tensors are missing"):
        map_state(build_model("res110", 100), "res110", res56, 100, "res56.pth")
    with pytest.raises(UserError, match=r"does not hold a res20: its tensor layer1\.3\.conv1\.weight has no place"):
        map_state(build_model("res20", 100), "res20", res56, 100, "res56.pth")
    with pytest.raises(UserError, match=r"holds a 100-class model, but this run's dataset has 10 classes"):
        map_state(build_model("res56", 10), "res56", res56, 10, "res56.pth")
    with pytest.raises(UserError, match=r"does not hold a wrn_40_2: 1 of its tensors are missing \(first: "
                                        r"stages\.0\.0\.shortcut\.weight\)"):
        map_state(build_model("wrn_40_2", 100), "wrn_40_2", read_foreign(tmp_path / "wrn.pth").state, 100, "wrn.pth")
    repdistiller_checkpoint(tmp_path / "shuv1.pth", "ShuffleV1", 100)
    repdistiller_checkpoint(tmp_path / "mv2.pth", "MobileNetV2", 100)
    with pytest.raises(UserError, match=r"does not hold a shufflev2: \d+ of its tensors are missing \(first: "
                                        r"stages\.0\.0\.conv4\.weight\)"):
        map_state(build_model("shufflev2", 100), "shufflev2", read_foreign(tmp_path / "shuv1.pth").state, 100, "x")
    with pytest.raises(UserError, match=r"does not hold a shufflev1: its tensor conv1\.0\.weight has no place"):
        map_state(build_model("shufflev1", 100), "shufflev1", read_foreign(tmp_path / "mv2.pth").state, 100, "x")
    with pytest.raises(UserError, match="no key rules for vgg11"):
        map_state(build_model("vgg11", 100), "vgg11", res56, 100, "res56.pth")


def test_files_that_are_no_weights_are_refused(tmp_path):
    torch.save({"opt": argparse.Namespace(model="resnet110"), "model": {}}, tmp_path / "resnet110_last.pth")
    with pytest.raises(UserError, match=r"needs pickled Python code \(argparse\.Namespace\) to load"):
        read_foreign(tmp_path / "resnet110_last.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        read_foreign(tmp_path / "garbage.pth")
    torch.save({"epoch": 3, "model": {"conv1.weight": [1, 2]}}, tmp_path / "lists.pth")
    with pytest.raises(UserError, match="neither a state dict nor"):
        read_foreign(tmp_path / "lists.pth")
    with pytest.raises(UserError, match="no file at"):
        read_foreign(tmp_path / "absent.pth")


def accuracy_of(model: torch.nn.Module, npz: Path) -> float:
    """Test accuracy computed here, apart from the engine."""
    data = load_dataset(str(npz), "./data", torch.device("cpu"))
    correct = 0
    with torch.no_grad():
        for x, y in test_batches(data, 100):
            correct += int((model.eval()(x).argmax(1) == y).sum())
    return 100.0 * correct / len(data.y_test)


def test_an_import_writes_an_ordinary_teacher_run_folder(tiny_npz, tmp_path):
    checkpoint = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    checkpoint.parent.mkdir()
    repdistiller_checkpoint(checkpoint, "resnet8", 10)
    out = tmp_path / "teacher-res8-seed30"
    argv = ["--model", "res8", "--import", str(checkpoint), "--dataset", str(tiny_npz), "--gpu_id", "cpu",
            "--amp", "off", "--out_dir", str(out)]
    summary = train_teacher.main(argv)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["imported_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (summary["imported_epoch"], summary["imported_layout"]) == (240, "repdistiller")
    assert summary["imported_accuracy"] == pytest.approx(72.34, abs=1e-4)
    assert summary["imported_file"] == str(checkpoint.resolve()) and summary["stage"] == "teacher"

    ckpt = load_checkpoint(out / "teacher.pt", "teacher", "test")  # weights_only, this project's format
    model = imported("res8", checkpoint, 10)
    assert ckpt["fingerprint"] == model_fingerprint(model) and ckpt["imported_sha256"] == summary["imported_sha256"]
    assert (ckpt["model"], ckpt["num_classes"], ckpt["image_size"]) == ("res8", 10, 32)
    assert summary["final_test_acc"] == pytest.approx(accuracy_of(model, tiny_npz))

    assert train_teacher.main([*argv, "--resume"]) == summary  # this very import: nothing to do
    with pytest.raises(UserError, match="already holds a run"):
        train_teacher.main(argv)
    other = tmp_path / "other.pth"
    repdistiller_checkpoint(other, "resnet8", 10, seed=1)
    with pytest.raises(UserError, match="holds another run than this import"):
        train_teacher.main([*argv[:3], str(other), *argv[4:], "--resume"])
    with pytest.raises(UserError, match="--epochs makes no sense with --import"):
        train_teacher.main([*argv, "--epochs", "3"])


def test_a_pickled_code_file_is_one_line_on_stderr(tmp_path):
    torch.save({"opt": argparse.Namespace(model="resnet110"), "model": {}}, tmp_path / "resnet110_last.pth")
    result = run_script("train_teacher.py", "--model", "res110", "--import", str(tmp_path / "resnet110_last.pth"),
                        "--dataset", "synthetic", "--out_dir", str(tmp_path / "out"))
    assert_clean_failure(result, "needs pickled Python code (argparse.Namespace) to load")
    assert not (tmp_path / "out").exists()
