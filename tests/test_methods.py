"""FitNets, AT, CRD and TAKD: losses against independent float64 formulas, shapes for every Table-1 pair,
learning on learnable data, exact resume across FitNets' phases and with CRD's memory, TAKD's chain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_clean_failure, assert_resumed, kill_after_epochs, metrics_lines, run_script
from torch import nn

import test_dih
import train_heads
import train_teacher
from data import from_arrays, train_batches
from heads import heads_for
from methods import METHODS, Setup
from methods.at import at_loss, attention_map
from methods.crd import ContrastMemory, NegativeSampler, contrast_loss
from methods.fitnets import Regressor, regressor_for
from methods.takd import default_assistant
from models import build_model
from sweep.grid import PRESETS
from utils import UserError

TABLE1_TEACHERS = ["res14", "res20", "res32", "res56", "res110", "res18", "res34", "vgg11", "wrn_28_2"]
FAST = ["--gpu_id", "cpu", "--batch_size", "64"]


# ------------------------------------------------------------------------------------------ AT


def reference_attention(feature: torch.Tensor) -> torch.Tensor:
    """a(f) in float64, element by element: Σ_c f_c² / C at each position, divided by its L2 norm."""
    f = feature.double()
    b, c, h, w = f.shape
    maps = torch.zeros(b, h * w, dtype=torch.float64)
    for i in range(b):
        for ch in range(c):
            maps[i] += f[i, ch].flatten() ** 2 / c
        maps[i] /= math.sqrt(float((maps[i] ** 2).sum()))
    return maps


def reference_pool(feature: torch.Tensor, size: int) -> torch.Tensor:
    """Average over non-overlapping k x k blocks (the maps here differ by powers of two)."""
    k = feature.shape[-1] // size
    return feature.double().unfold(2, k, k).unfold(3, k, k).mean(dim=(-1, -2))


def test_attention_maps_and_loss_against_float64():
    gen = torch.Generator().manual_seed(0)
    # A 3-tap student against a 4-tap teacher: taps 1-3 pair; channels differ; the teacher's first map is
    # half the size (VGG-like) and its second twice it: each time the larger is pooled to the smaller.
    student = [torch.randn(3, 16, 32, 32, generator=gen), torch.randn(3, 32, 8, 8, generator=gen),
               torch.randn(3, 64, 8, 8, generator=gen)]
    teacher = [torch.randn(3, 64, 16, 16, generator=gen), torch.randn(3, 128, 16, 16, generator=gen),
               torch.randn(3, 256, 8, 8, generator=gen), torch.randn(3, 512, 4, 4, generator=gen)]
    torch.testing.assert_close(attention_map(student[0]).double(), reference_attention(student[0]),
                               rtol=1e-5, atol=1e-7)
    expected = 0.0
    for s, t in zip(student, teacher[:3], strict=True):
        size = min(s.shape[-1], t.shape[-1])
        a_s = reference_attention(reference_pool(s, size))
        a_t = reference_attention(reference_pool(t, size))
        expected += float(((a_s - a_t) ** 2).mean())
    assert float(at_loss(student, teacher)) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------- FitNets


EXPECTED_REGRESSOR = {  # res8's tap 1 is 16x32x32
    **dict.fromkeys(["res14", "res20", "res32", "res56", "res110"], ("identity", None)),
    "res18": ("conv", 1), "res34": ("conv", 1),  # 64x32x32: 1x1 conv, same size
    "vgg11": ("conv", 3),  # 64x16x16: 3x3 stride-2 conv
    "wrn_28_2": ("conv", 1),  # 32x32x32, pre-activation: no ReLU
}


@pytest.mark.parametrize("teacher_name", TABLE1_TEACHERS)
def test_every_table1_teacher_pairs_with_res8(teacher_name):
    """FitNets' regressor and AT's pairing build and run for each Table-1 teacher into res8."""
    torch.manual_seed(0)
    student, teacher = build_model("res8", 100), build_model(teacher_name, 100)
    s_shape, t_shape = student.tap_shapes()[0], teacher.tap_shapes()[0]
    regressor = regressor_for(s_shape, t_shape, teacher.taps_nonnegative)
    kind, kernel = EXPECTED_REGRESSOR[teacher_name]
    if kind == "identity":
        assert isinstance(regressor, nn.Identity)
    else:
        assert isinstance(regressor, Regressor) and regressor.conv.kernel_size == (kernel, kernel)
        assert regressor.relu == (teacher_name != "wrn_28_2")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hint = regressor(student.forward_to_tap(x, 0))
        target = teacher.forward_to_tap(x, 0)
    assert hint.shape == target.shape == (2, *t_shape)
    # FitNets' hint loss is the plain mean over B·C·H·W of the squared difference.
    mse = F.mse_loss(hint, target)
    assert float(mse) == pytest.approx(float(((hint.double() - target.double()) ** 2).sum() / hint.numel()), rel=1e-5)
    with torch.no_grad():
        s, t = student.forward_features(x), teacher.forward_features(x)
        assert torch.isfinite(at_loss(s.taps, t.taps))
        assert s.pooled.shape == (2, 64) and t.pooled.shape == (2, teacher.feature_dim)


def test_regressor_shapes_and_refusal():
    assert Regressor((16, 32, 32), (64, 16, 16), True)(torch.randn(1, 16, 32, 32)).shape == (1, 64, 16, 16)
    assert Regressor((16, 16, 16), (64, 32, 32), True)(torch.randn(1, 16, 16, 16)).shape == (1, 64, 32, 32)
    assert Regressor((16, 12, 12), (8, 8, 8), True)(torch.randn(1, 16, 12, 12)).shape == (1, 8, 8, 8)
    with pytest.raises(UserError, match="no regressor"):
        Regressor((16, 8, 8), (16, 32, 32), True)


# ------------------------------------------------------------------------------------------ CRD


def test_contrast_loss_on_a_hand_checked_case():
    # B = 1, K = 2 negatives, N = 4: noise K/N = 0.5. Positive 1.5, negatives 0.5 and 0.0.
    x = torch.tensor([[1.5, 0.5, 0.0]], dtype=torch.float64)
    eps = 1e-7
    expected = -(math.log(1.5 / (2.0 + eps)) + math.log(0.5 / (1.0 + eps)) + math.log(0.5 / (0.5 + eps)))
    assert float(contrast_loss(x, 4)) == pytest.approx(expected, rel=1e-12)


def test_memory_scores_update_and_normalising_constant():
    torch.manual_seed(0)
    n, dim, temperature = 6, 4, 0.07
    memory = ContrastMemory(n, dim, temperature, momentum=0.5).double()
    bank_s, bank_t = memory.memory_s.clone(), memory.memory_t.clone()
    v_s = F.normalize(torch.randn(2, dim, dtype=torch.float64), dim=1)
    v_t = F.normalize(torch.randn(2, dim, dtype=torch.float64), dim=1)
    index = torch.tensor([1, 4])
    contrast = torch.tensor([[1, 0, 2], [4, 5, 3]])
    out_s, out_t = memory(v_s, v_t, index, contrast)

    raw_s = torch.stack([torch.exp(bank_t[contrast[b]] @ v_s[b] / temperature) for b in range(2)])
    raw_t = torch.stack([torch.exp(bank_s[contrast[b]] @ v_t[b] / temperature) for b in range(2)])
    z_s, z_t = float(raw_s.mean() * n), float(raw_t.mean() * n)  # set from this first batch
    torch.testing.assert_close(out_s, raw_s / z_s)
    torch.testing.assert_close(out_t, raw_t / z_t)
    for bank, new, v in ((bank_s, memory.memory_s, v_s), (bank_t, memory.memory_t, v_t)):
        moved = 0.5 * bank[index] + 0.5 * v
        torch.testing.assert_close(new[index], moved / moved.norm(dim=1, keepdim=True))
        untouched = [i for i in range(n) if i not in index.tolist()]
        assert torch.equal(new[untouched], bank[untouched])
    memory(v_s, v_t, index, contrast)  # Z is frozen after the first batch
    assert float(memory.z_s) == pytest.approx(z_s) and float(memory.z_t) == pytest.approx(z_t)


@pytest.mark.parametrize("k", [5, 40])
def test_negatives_come_from_other_classes(k):
    """K = 5: distinct draws (exact mode); K = 40 > the 24 negatives of a class: drawn with replacement."""
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3] * 8)[torch.randperm(32)]
    sampler = NegativeSampler(labels, 4, k)
    assert sampler.replace == (k > 24)
    y = labels[:16]
    draws = sampler(y)
    assert draws.shape == (16, k)
    assert (labels[draws] != y[:, None]).all()
    if k <= 24:
        assert all(len(set(row.tolist())) == k for row in draws)
    # Every negative of class 0 can be drawn.
    many = sampler(torch.zeros(2000, dtype=torch.long))
    assert set(many.flatten().tolist()) == set((labels != 0).nonzero().flatten().tolist())


# ------------------------------------------------------------------------------------------ TAKD


def test_default_assistants():
    assert default_assistant("res110") == default_assistant("vgg11") == default_assistant("wrn_28_2") == "res20"
    assert default_assistant("res20") == "res14"
    assert default_assistant("res14") is None


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> dict[str, Path]:
    """A 2000-image slice of the synthetic set and a res8 teacher trained on it for 3 epochs."""
    from data import make_synthetic, save_npz

    root = tmp_path_factory.mktemp("learnable")
    npz = root / "slice.npz"
    save_npz(npz, *make_synthetic(2000, 500, seed=0))
    train_teacher.main(["--model", "res8", "--dataset", str(npz), "--epochs", "3", "--lr", "0.05", "--schedule", "2",
                        "--out_dir", str(root / "teacher"), *FAST])
    return {"npz": npz, "teacher": root / "teacher" / "teacher.pt", "root": root}


def student(learnable: dict[str, Path], method: str, out: Path, *extra: str) -> dict:
    return test_dih.main(["--method", method, "--student", "res8", "--teacher", "res8", "--teacher_ckpt",
                          str(learnable["teacher"]), "--dataset", str(learnable["npz"]), "--epochs", "3",
                          "--lr", "0.05", "--schedule", "2", "--out_dir", str(out), *FAST, *extra])[method]


@pytest.mark.parametrize(("method", "extra"), [("fitnets", ["--hint_epochs", "1"]), ("at", []),
                                               ("crd", ["--nce_k", "1024"])])
def test_each_method_learns(learnable, tmp_path, method, extra):
    """Above chance (10%) after 3 epochs on a 2000-image slice; every hyper-parameter recorded."""
    summary = student(learnable, method, tmp_path, *extra)
    assert summary["final_test_acc"] > 25.0, summary
    assert summary["method"] == method and summary["teacher"] == "res8"
    saved = torch.load(tmp_path / "student.pt", weights_only=True)
    for key in METHODS[method].defaults:
        assert key in summary and key in saved and saved[key] == summary[key]
    build_model("res8", 10).load_state_dict(saved["state_dict"])  # the plain student, extras apart
    if method == "fitnets":
        rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r["phase"] for r in rows] == ["hint", "kd", "kd", "kd"]
        assert rows[0]["train_acc"] is None and [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.05, 0.005])
        assert summary["phases"] == [{"name": "hint", "epochs": 1}, {"name": "kd", "epochs": 3}]
    if method == "crd":
        extras = torch.load(tmp_path / "extras.pt", weights_only=True)
        assert extras["state_dict"]["memory.memory_s"].shape == (2000, 128)
        assert extras["model_fingerprint"] == saved["fingerprint"]


def test_takd_chain_and_refusals(learnable, tmp_path):
    """Teacher → KD assistant in its default folder → TAKD student; refusals name the command to run."""
    import shutil

    shutil.copy(learnable["npz"], tmp_path / "slice.npz")
    common = ["--dataset", "slice.npz", "--gpu_id", "cpu", "--epochs", "1", "--teacher", "res8",
              "--teacher_ckpt", str(learnable["teacher"])]
    missing = run_script("test_dih.py", "--method", "takd", "--ta", "res14", *common, cwd=tmp_path)
    assert_clean_failure(missing, "no checkpoint", "python3 test_dih.py --method kd --student res14 --teacher res8")
    assert run_script("test_dih.py", "--method", "kd", "--student", "res14", *common, cwd=tmp_path).returncode == 0
    result = run_script("test_dih.py", "--method", "takd", "--ta", "res14", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = tmp_path / "runs" / "slice"
    summary = json.loads((runs / "student-res8-takd-res8-ta-res14-a0.1-t5-seed30" / "summary.json").read_text())
    ta = torch.load(runs / "student-res14-kd-res8-a0.1-t5-seed30" / "student.pt", weights_only=True)
    teacher = torch.load(learnable["teacher"], weights_only=True)
    assert summary["ta"] == "res14" and summary["ta_fingerprint"] == ta["fingerprint"]
    assert summary["ta_ckpt"] == "runs/slice/student-res14-kd-res8-a0.1-t5-seed30/student.pt"  # which one it used
    assert summary["teacher_fingerprint"] == teacher["fingerprint"] == ta["teacher_fingerprint"]

    # An assistant distilled from another teacher is refused.
    other = tmp_path / "other"
    train_teacher.main(["--model", "res8", "--dataset", str(learnable["npz"]), "--epochs", "1", "--seed", "31",
                        "--out_dir", str(other), *FAST])
    with pytest.raises(UserError, match="not distilled from this teacher"):
        test_dih.main(["--method", "takd", "--ta", "res14", "--ta_ckpt", str(runs / "student-res14-kd-res8-a0.1-t5"
                       "-seed30" / "student.pt"), "--teacher", "res8", "--teacher_ckpt", str(other / "teacher.pt"),
                       "--dataset", str(learnable["npz"]), "--epochs", "1", "--out_dir", str(tmp_path / "x"), *FAST])
    # A flag that makes no sense for the method: one line.
    assert_clean_failure(run_script("test_dih.py", "--method", "at", "--ta", "res20", *common, cwd=tmp_path),
                         "--ta makes no sense with --method at")


def test_any_student_serves_as_a_teacher(learnable, tmp_path):
    """A student.pt of the right architecture works as --teacher_ckpt for heads (DIH) and KD."""
    student(learnable, "kd", tmp_path / "s1", "--epochs", "1")
    as_teacher = str(tmp_path / "s1" / "student.pt")
    train_heads.main(["--teacher", "res8", "--teacher_ckpt", as_teacher, "--dataset", str(learnable["npz"]),
                      "--epochs", "1", "--out_dir", str(tmp_path / "h"), *FAST])
    summary = test_dih.main(["--method", "dih", "--teacher", "res8", "--teacher_ckpt", as_teacher, "--heads_ckpt",
                             str(tmp_path / "h" / "heads.pt"), "--dataset", str(learnable["npz"]), "--epochs", "1",
                             "--out_dir", str(tmp_path / "s2"), *FAST])["dih"]
    assert summary["teacher_fingerprint"] == torch.load(as_teacher, weights_only=True)["fingerprint"]


# ---------------------------------------------------------------------------------- resume


def _same_run(a: Path, b: Path) -> None:
    for name in ("student.pt", "extras.pt"):
        if (a / name).exists() or (b / name).exists():
            x, y = (torch.load(p / name, weights_only=True)["state_dict"] for p in (a, b))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                          for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert strip(a) == strip(b)


@pytest.fixture(scope="module")
def tiny_teacher(tiny_npz, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_teacher")
    train_teacher.main(["--model", "res8", "--dataset", str(tiny_npz), "--epochs", "1", "--out_dir", str(out), *FAST])
    return out / "teacher.pt"


@pytest.mark.parametrize(("method", "extra", "kill_after"), [
    ("fitnets", ["--hint_epochs", "2"], 1),  # killed in the hint phase
    ("fitnets", ["--hint_epochs", "2"], 3),  # killed in the KD phase
    ("crd", ["--nce_k", "64"], 1),  # memory banks and Z restored
])
def test_killed_run_resumes_bit_identical(tiny_npz, tiny_teacher, tmp_path, method, extra, kill_after):
    common = [str(ROOT / "test_dih.py"), "--method", method, "--teacher", "res8", "--teacher_ckpt", str(tiny_teacher),
              "--dataset", str(tiny_npz), "--epochs", "2", "--schedule", "1", *FAST, *extra]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_script(*common, "--out_dir", str(whole)).returncode == 0
    kill_after_epochs([*common, "--out_dir", str(cut)], cut, kill_after)
    before = metrics_lines(cut)
    resumed = run_script(*common, "--out_dir", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_resumed(cut, before, resumed.stdout)
    _same_run(whole, cut)


# ------------------------------------------------------------------------- across architectures

CROSS_PRESET = PRESETS["repdistiller-cifar100-cross"]


def step_every_phase(method: str, teacher: nn.Module, student_name: str, heads: nn.Module, image_size: int = 16,
                     classes: int = 10) -> tuple[list[str], list[str]]:
    """One SGD step of each of `method`'s phases on a fresh `student_name` taught by `teacher`, on a batch of 4 random
    images: (every phase's name, the names of those whose step moved the student's weights). Losses must be finite."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, image_size, image_size, 3), generator=gen, dtype=torch.uint8).numpy()
    y = (torch.arange(8) % classes).numpy()
    dataset = from_arrays(x, y, x[:4], y[:4], torch.device("cpu"))
    spec = METHODS[method]
    torch.manual_seed(0)
    student = build_model(student_name, classes)
    setup = Setup(student, None if spec.teacher == "none" else teacher, dict(spec.defaults), dataset, meta={},
                  heads=heads if spec.heads else None, batch_size=4)
    stage = spec.build(setup)
    phases, moved = stage.phases(1), []
    for phase in phases:
        stage.trainable.train()
        stage.start_epoch(1)
        batch = next(train_batches(dataset, 4, torch.Generator().manual_seed(1)))
        shared = stage.shared_pass.select(stage.shared_pass(batch, phase.needs), phase.needs) if phase.needs else None
        before = [p.detach().clone() for p in student.parameters()]
        loss = phase.loss(batch, shared)[0]
        assert torch.isfinite(loss), (method, phase.name)
        stage.trainable.zero_grad(set_to_none=True)
        loss.backward()
        torch.optim.SGD(phase.parameters, lr=0.01).step()
        if any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True)):
            moved.append(phase.name)
    return [phase.name for phase in phases], moved


@pytest.mark.parametrize(("teacher_name", "student_name"), CROSS_PRESET["pairs"])
def test_every_preset_method_takes_a_step_on_every_cross_architecture_pair(teacher_name, student_name):
    """RepDistiller's table 2 pairs: FitNets' regressor between taps of other widths and sizes, AT between maps of
    other sizes, CRD's embeddings of other widths, KD, DKD, and DIH with the teacher's heads; each phase of every
    method of the preset steps the student (FitNets' hint phase: its stem and first stage)."""
    torch.manual_seed(0)
    teacher = build_model(teacher_name, 10).eval().requires_grad_(False)
    heads = heads_for(teacher, 10, 16).eval().requires_grad_(False)
    for method in CROSS_PRESET["methods"]:
        phases, moved = step_every_phase(method, teacher, student_name, heads)
        assert moved == phases, method


def test_a_pair_no_regressor_can_bridge_is_refused_in_one_line():
    """At 17 pixels MobileNetV2's stride-2 stem leaves a 9x9 first tap against ResNet-50's 17x17: neither half nor
    at least as large, so FitNets refuses the pair (one UserError line); the other methods bridge it."""
    teacher = build_model("res50", 10).eval().requires_grad_(False)
    with pytest.raises(UserError, match=r"^FitNets: no regressor maps a 12x9x9 student tap onto a 256x17x17 teacher "
                                        r"tap \(the student's map must not be smaller, or half\)$"):
        step_every_phase("fitnets", teacher, "mobilenetv2", None, image_size=17)
    assert step_every_phase("at", teacher, "mobilenetv2", None, image_size=17) == (["train"], ["train"])
