"""The three stages chained through their CLIs on tiny synthetic data, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_clean_failure, assert_resumed, kill_after_epochs, metrics_lines, run_script

import test_dih
import train_heads
import train_teacher
from checkpoint import load_checkpoint
from utils import UserError

FAST = ["--gpu_id", "cpu", "--batch_size", "64"]


def teacher(npz: Path, out: Path, model: str = "res8", epochs: int = 2, *extra: str) -> dict:
    return train_teacher.main(["--model", model, "--dataset", str(npz), "--epochs", str(epochs),
                               "--out_dir", str(out), *FAST, *extra])


def heads(npz: Path, out: Path, teacher_ckpt: Path, model: str = "res8", *extra: str) -> dict:
    return train_heads.main(["--teacher", model, "--teacher_ckpt", str(teacher_ckpt), "--dataset", str(npz),
                             "--epochs", "1", "--out_dir", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def trained(tiny_npz, tmp_path_factory) -> dict[str, Path]:
    """One res8 teacher and its heads, shared by the tests below that only read them."""
    root = tmp_path_factory.mktemp("trained")
    teacher(tiny_npz, root / "teacher")
    heads(tiny_npz, root / "heads", root / "teacher" / "teacher.pt")
    return {"teacher": root / "teacher" / "teacher.pt", "heads": root / "heads" / "heads.pt", "root": root}


@pytest.fixture(scope="module")
def npz64(tmp_path_factory) -> Path:
    """A 64x64 dataset (Tiny-ImageNet's size): a slice of the synthetic set with every pixel doubled."""
    from data import make_synthetic, save_npz

    x_train, y_train, x_test, y_test = make_synthetic(128, 64, seed=1)
    path = tmp_path_factory.mktemp("data64") / "px64.npz"
    save_npz(path, x_train.repeat(2, 1).repeat(2, 2), y_train, x_test.repeat(2, 1).repeat(2, 2), y_test)
    return path


def test_stage1_writes_the_contracted_outputs(tiny_npz, tmp_path):
    summary = teacher(tiny_npz, tmp_path, "res8", 2, "--schedule", "[1,", "5]", "--gamma", "0.5")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["lr"] for r in rows] == [0.1, 0.05]
    for row in rows:
        assert {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"} <= set(row)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["stage"] == "teacher" and on_disk["model"] == "res8" and on_disk["epochs"] == 2
    assert on_disk["final_test_acc"] == rows[-1]["test_acc"]
    assert on_disk["best_test_acc"] == max(r["test_acc"] for r in rows)
    ckpt = torch.load(tmp_path / on_disk["checkpoint"], weights_only=True)
    assert ckpt["kind"] == "teacher" and ckpt["model"] == "res8" and ckpt["num_classes"] == 10
    assert ckpt["dataset"] == on_disk["dataset"] and ckpt["epoch"] == 2 and ckpt["args"]["seed"] == 30


def test_stage2_leaves_the_teacher_bit_identical(trained, tiny_npz, tmp_path):
    from data import load_dataset
    from engine import TrainConfig, fit
    from heads import heads_for
    from models import build_model
    from stages import HeadsTraining

    data = load_dataset(str(tiny_npz), "unused", torch.device("cpu"))
    model = build_model("res8", 10)
    model.load_state_dict(load_checkpoint(trained["teacher"], "teacher", "t")["state_dict"])
    model.train()  # the stage must put it in eval mode itself
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.1, momentum=0.9, wd=5e-4, nesterov=True, schedule=(60,),
                      gamma=0.1, seed=0)
    stage = HeadsTraining(model, heads_for(model, 10), {"model": "res8", "fingerprint": "x"})
    fit(stage, data, cfg, tmp_path, {})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running statistics
    assert not any(p.requires_grad for p in model.parameters())

    stage1 = json.loads((trained["teacher"].parent / "summary.json").read_text())
    stage2 = json.loads((trained["heads"].parent / "summary.json").read_text())
    assert stage2["final_classifier_test_acc"] == stage1["final_test_acc"]
    assert [h["tap"] for h in stage2["heads"]] == ["layer1", "layer2", "layer3"]
    saved = torch.load(trained["heads"], weights_only=True)
    assert saved["taps"] == [["layer1", [16, 32, 32]], ["layer2", [32, 16, 16]], ["layer3", [64, 8, 8]]]
    assert saved["teacher"]["fingerprint"] == torch.load(trained["teacher"], weights_only=True)["fingerprint"]


@pytest.mark.parametrize("method", ["dih", "kd", "ce"])
def test_students_of_each_method(trained, tiny_npz, tmp_path, method):
    inputs = {"ce": [], "kd": ["--teacher", "res8", "--teacher_ckpt", str(trained["teacher"])]}
    inputs["dih"] = [*inputs["kd"], "--heads_ckpt", str(trained["heads"])]
    summary = test_dih.main(["--method", method, "--student", "res8", *inputs[method], "--dataset",
                             str(tiny_npz), "--epochs", "1", "--out_dir", str(tmp_path), *FAST])[method]
    assert summary["stage"] == "student" and summary["method"] == method and summary["model"] == "res8"
    assert summary["teacher"] == (None if method == "ce" else "res8")
    assert summary["alpha"] == (0.0 if method == "ce" else 0.1)
    assert torch.load(tmp_path / "student.pt", weights_only=True)["kind"] == "student"


SEED_EXAMPLE = ("--alpha 0.1 --batch_size 64 --dataset cifar100 --epochs 200 --gpu_id 0 --lr 0.1 "
                "--schedule [60, 120, 180] --temperature 5 --wd 0.0005")  # the seed README's command, verbatim


def test_default_locations_and_the_seed_example(tmp_path):
    """Stages 1 and 2 with defaults, then the seed README's own command exactly as written, only its data and device
    swapped for an offline CPU run (`--dataset cifar100` -> four 16x16 images, `--gpu_id 0` -> cpu): all 200
    epochs, each one partial batch, the LR dropping at 60, 120 and 180."""
    from data import make_synthetic, save_npz

    x, y, _, _ = make_synthetic(4, 1, seed=0)
    save_npz(tmp_path / "ten.npz", x[:, ::2, ::2], y, x[:, ::2, ::2], y)
    for script in ("train_teacher.py", "train_heads.py"):
        result = run_script(script, "--dataset", "ten.npz", "--gpu_id", "cpu", "--epochs", "1", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    swap = {"--dataset": "ten.npz", "--gpu_id": "cpu"}
    words = SEED_EXAMPLE.split()
    argv = [swap.get(words[i - 1], word) if i else word for i, word in enumerate(words)]
    assert [a for a, b in zip(argv, words, strict=True) if a != b] == ["ten.npz", "cpu"]
    result = run_script("test_dih.py", *argv, cwd=tmp_path, timeout=600, threads=1)  # batches of 4: one is faster
    assert result.returncode == 0, result.stderr
    runs = tmp_path / "runs" / "ten"
    assert sorted(p.name for p in runs.iterdir()) == [
        "heads-res110-seed30", "student-res8-dih-res110-a0.1-t5-seed30", "teacher-res110-seed30"]
    run = runs / "student-res8-dih-res110-a0.1-t5-seed30"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "dih" and summary["teacher"] == "res110" and summary["temperature"] == 5
    assert summary["epochs"] == 200 and summary["config"]["wd"] == 0.0005 and summary["config"]["lr"] == 0.1
    lrs = [json.loads(line)["lr"] for line in metrics_lines(run)]
    assert len(lrs) == 200 and lrs[59] == 0.1 and lrs[60] == pytest.approx(0.01) and lrs[-1] == pytest.approx(1e-4)


@pytest.mark.parametrize("script", ["train_teacher.py", "test_dih.py"])
def test_killed_run_resumes_bit_identical(trained, tiny_npz, tmp_path, script):
    common = [str(ROOT / script), "--dataset", str(tiny_npz), "--epochs", "4", "--schedule", "2", *FAST]
    if script == "test_dih.py":
        common += ["--teacher", "res8", "--teacher_ckpt", str(trained["teacher"]),
                   "--heads_ckpt", str(trained["heads"])]
    else:
        common += ["--model", "res8"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_script(*common[:1], *common[1:], "--out_dir", str(whole)).returncode == 0
    kill_after_epochs([*common, "--out_dir", str(cut)], cut)
    before = metrics_lines(cut)
    resumed = run_script(*common[:1], *common[1:], "--out_dir", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_resumed(cut, before, resumed.stdout)

    kind = "teacher" if script == "train_teacher.py" else "student"
    a = torch.load(whole / f"{kind}.pt", weights_only=True)["state_dict"]
    b = torch.load(cut / f"{kind}.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                          for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert strip(whole) == strip(cut) and len(strip(cut)) == 4
    # A finished run is left alone by --resume, and never overwritten without it.
    before = (cut / f"{kind}.pt").read_bytes()
    assert "already finished" in run_script(*common[:1], *common[1:], "--out_dir", str(cut), "--resume").stdout
    assert_clean_failure(run_script(*common[:1], *common[1:], "--out_dir", str(cut)), "already holds a run")
    assert (cut / f"{kind}.pt").read_bytes() == before


def test_resume_refuses_changed_arguments(tiny_npz, tmp_path):
    teacher(tiny_npz, tmp_path, "res8", 1)
    (tmp_path / "summary.json").unlink()
    with pytest.raises(UserError, match="lr"):
        teacher(tiny_npz, tmp_path, "res8", 1, "--resume", "--lr", "0.05")


def test_bad_inputs_exit_cleanly(tiny_npz, tmp_path):
    bad_npz = tmp_path / "bad.npz"
    bad_npz.write_bytes(b"not a zip file")
    base = ["--dataset", str(tiny_npz), "--epochs", "1", "--gpu_id", "cpu"]
    cases = [
        (["--model", "res9"], "choose from: res8"),
        (["--gpu_id", "7"], "GPU 7"),
        (["--epochs", "0"], "--epochs"),
        (["--dataset", str(bad_npz)], "bad.npz"),
        (["--dataset", str(tmp_path / "missing.npz")], "missing.npz"),
        (["--schedule", "sixty"], "--schedule"),
        (["--model", "res8", "--lr", "1e30"], "loss became"),
    ]
    for i, (flags, fragment) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert_clean_failure(run_script("train_teacher.py", *base, "--out_dir", str(out), *flags), fragment)
        assert not (out / "teacher.pt").exists() and not (out / "summary.json").exists()


def test_checkpoint_chain_refuses_mismatches(trained, tiny_npz, tmp_path):
    from data import make_synthetic, save_npz

    def student(*flags: str) -> None:
        test_dih.main(["--teacher", "res8", "--teacher_ckpt", str(trained["teacher"]), "--heads_ckpt",
                       str(trained["heads"]), "--dataset", str(tiny_npz), "--epochs", "1", "--out_dir",
                       str(tmp_path / "s"), *FAST, *flags])

    truncated, garbage = tmp_path / "truncated.pt", tmp_path / "garbage.pt"
    truncated.write_bytes(trained["teacher"].read_bytes()[:5000])
    garbage.write_bytes(b"\x00garbage" * 100)
    other_teacher = tmp_path / "other"
    teacher(tiny_npz, other_teacher, "res8", 1, "--seed", "31")
    other_data = tmp_path / "other.npz"
    save_npz(other_data, *make_synthetic(200, 100, seed=5))
    x_train, y_train, x_test, y_test = make_synthetic(200, 100, seed=0)
    five = tmp_path / "five.npz"
    save_npz(five, x_train, y_train % 5, x_test, y_test % 5)

    refusals = [
        (["--teacher_ckpt", str(tmp_path / "nope.pt")], "no checkpoint"),
        (["--teacher_ckpt", str(truncated)], "not a readable checkpoint"),
        (["--teacher_ckpt", str(garbage)], "not a readable checkpoint"),
        (["--teacher_ckpt", str(trained["heads"])], "holds heads weights"),
        (["--teacher", "res20"], "model='res8'"),
        (["--dataset", str(other_data)], "dataset="),
        (["--dataset", str(five)], "num_classes"),
        (["--teacher_ckpt", str(other_teacher / "teacher.pt")], "another teacher"),
        (["--heads_ckpt", str(trained["teacher"])], "holds teacher weights"),
    ]
    for flags, fragment in refusals:
        with pytest.raises(UserError, match=fragment.replace("[", r"\[")):
            student(*flags)
        assert not (tmp_path / "s" / "student.pt").exists()
    result = run_script("test_dih.py", "--teacher", "res8", "--teacher_ckpt", str(truncated), "--dataset",
                        str(tiny_npz), "--gpu_id", "cpu", "--out_dir", str(tmp_path / "s"))
    assert_clean_failure(result, "truncated.pt")


def test_synthetic_data_is_learnable(tmp_path):
    """ResNet-20 well above chance (10%) after three short CPU epochs on a slice of the built-in dataset."""
    from data import make_synthetic, save_npz

    npz = tmp_path / "slice.npz"
    save_npz(npz, *make_synthetic(2000, 500, seed=0))
    summary = train_teacher.main(["--model", "res20", "--dataset", str(npz), "--epochs", "3", "--lr", "0.05",
                                  "--schedule", "2", "--out_dir", str(tmp_path / "run"), *FAST])
    assert summary["final_test_acc"] > 25.0


def test_64px_npz_through_the_three_stages(npz64, trained, tmp_path):
    teacher(npz64, tmp_path / "teacher", "res8", 1)
    heads(npz64, tmp_path / "heads", tmp_path / "teacher" / "teacher.pt")
    saved = torch.load(tmp_path / "heads" / "heads.pt", weights_only=True)
    assert saved["taps"] == [["layer1", [16, 64, 64]], ["layer2", [32, 32, 32]], ["layer3", [64, 16, 16]]]
    summary = test_dih.main(["--teacher", "res8", "--teacher_ckpt", str(tmp_path / "teacher" / "teacher.pt"),
                             "--heads_ckpt", str(tmp_path / "heads" / "heads.pt"), "--dataset", str(npz64),
                             "--epochs", "1", "--out_dir", str(tmp_path / "student"), *FAST])["dih"]
    assert summary["method"] == "dih"
    for kind in ("teacher", "heads", "student"):
        assert torch.load(tmp_path / kind / f"{kind}.pt", weights_only=True)["image_size"] == 64

    # The 32x32 teacher of the other tests is refused for 64x64 data, with one line naming the sizes.
    with pytest.raises(UserError, match="made for image_size=32, but this run needs image_size=64") as exc:
        heads(npz64, tmp_path / "refused", trained["teacher"])
    assert "\n" not in str(exc.value) and not (tmp_path / "refused").exists()


def test_images_too_small_for_a_model(tiny_npz, tmp_path):
    """VGG-11's five max-pools need 32x32 images or more: 16x16 data is refused before any training."""
    from data import make_synthetic, save_npz

    x_train, y_train, x_test, y_test = make_synthetic(40, 20, seed=2)
    npz16 = tmp_path / "px16.npz"
    save_npz(npz16, x_train[:, ::2, ::2], y_train, x_test[:, ::2, ::2], y_test)
    with pytest.raises(UserError, match="vgg11 cannot classify 16x16 images"):
        teacher(npz16, tmp_path / "vgg", "vgg11", 1)
    assert not (tmp_path / "vgg").exists()
