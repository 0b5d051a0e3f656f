"""The CUDA paths: default device and settings, bf16 + channels_last against fp32, the three stages and the demo,
resume, the --compile modes, out of memory. Skipped without a GPU; `make gpu-check` runs them (`pytest -m cuda`).

Tolerances, and why results are not bit-identical on a GPU: cuDNN autotuning (on by default) picks kernels by
timing, per process, and convolutions run in TF32 by default, so two identical runs may already differ in the
last bits; bf16 keeps 8 mantissa bits. Each test states its bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_clean_failure, kill_after_epochs, run_script
from test_fast_path import TOLERANCE, fast, reference, relative_error

import bench
import cli
import test_dih
import train_heads
import train_teacher
from data import Batch
from engine import WARMUP_STEPS, TrainConfig, make_optimizer, make_train_step, trainable_parameters

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run by make gpu-check")]

CUDA = torch.device("cuda:0")
NUM_CLASSES, BATCH = 10, 16
# fp32 on CUDA: convolutions in TF32 (10 mantissa bits) against the CPU's fp32. bf16: test_fast_path's bounds.
CUDA_TOLERANCE = {False: (2e-3, 2e-2), True: TOLERANCE[True]}


def config(**overrides) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=BATCH, lr=0.0, momentum=0.9, wd=5e-4, nesterov=True, schedule=(),
                       gamma=0.1, seed=0, **overrides)


@pytest.fixture(scope="module")
def models() -> bench.Models:
    return bench.make_models("res8", "res8", NUM_CLASSES)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)


def test_default_device_is_the_first_gpu_with_bf16_channels_last_and_autotuning():
    _, device, cfg = cli.parse(cli.common_parser(""), [])
    assert device == CUDA
    assert cfg.amp == torch.cuda.is_bf16_supported(including_emulation=False)
    assert cfg.channels_last and not cfg.compile and not cfg.cuda_graphs
    assert torch.backends.cudnn.benchmark


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", bench.STAGES)
def test_cuda_step_equals_the_cpu_fp32_step(kind, amp, models, batch):
    """channels_last, with and without bf16 autocast, on the GPU: the loss and gradients of the plain CPU step."""
    cfg = config(amp=amp, channels_last=True)
    loss, grads = fast(kind, models, *batch, cfg, device=CUDA)
    want_loss, want_grads = reference(kind, models, *batch)
    loss_rtol, grad_rtol = CUDA_TOLERANCE[amp]
    assert loss == pytest.approx(want_loss, rel=loss_rtol)
    assert relative_error({k: g.cpu() for k, g in grads.items()}, want_grads) < grad_rtol


@pytest.mark.parametrize("kind", bench.STAGES)
def test_bench_paths_agree_on_cuda(kind):
    plan = bench.Plan(warmup=0, steps=1, repeats=1)
    _, _, cfg = cli.parse(cli.common_parser(""), ["--batch_size", str(BATCH)])
    work = bench.Workload.build("res8", "res8", NUM_CLASSES, cfg, CUDA, plan)
    fast_loss, conventional_loss, ok = work.check(work.fast_step(kind), work.conventional_step(kind))
    assert ok, (fast_loss, conventional_loss)


# ------------------------------------------------------------------------------------------ --compile


def train(models: bench.Models, cfg: TrainConfig, epochs: list[float], no_logits: bool = False):
    """The teacher stage's engine step over epochs of 3 full batches and a partial one, at the given LRs: the
    losses and final weights. Exercises warm-up, capture per batch shape, and recapture when the LR drops."""
    torch.manual_seed(0)
    stage = bench.fast_stage("teacher", models, cfg, CUDA)
    optimizer = make_optimizer(trainable_parameters(stage.trainable), cfg)

    def features_only(b: Batch, shared=None):  # a loss that trains no classifier, as FitNets' hint phase
        loss, _ = stage.training_step(b)
        return loss, []

    step = make_train_step(features_only if no_logits else stage.training_step, optimizer, cfg)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen))
            for n in (BATCH, BATCH, BATCH, 5)]
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    losses, corrects = [], []
    for lr in epochs:
        for group in optimizer.param_groups:
            group["lr"] = lr
        for x, y in data:
            loss, correct = step(Batch(x.to(CUDA).contiguous(memory_format=memory_format), y.to(CUDA), None))
            losses.append(loss.item())
            corrects.append(None if correct is None else correct.item())
    return losses, corrects, {k: v.detach().cpu() for k, v in stage.model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("mode,amp", [("on", False), ("graphs", False), ("max", False), ("graphs", True)])
def test_compile_modes_equal_eager(models, mode, amp):
    """Every step of three epochs (LR 0.1, 0.1, 0.01) as the eager step gives it: CUDA graphs replay the same
    kernels (bound: TF32/bf16 run-to-run noise); torch.compile fuses them, changing the rounding (bound: 1e-3
    on each loss, 1e-2 relative on the final weights, in fp32)."""
    lrs = [0.1, 0.1, 0.01]
    eager_cfg = config(amp=amp, channels_last=True)
    cfg = config(amp=amp, channels_last=True, compile=mode in ("on", "max"), cuda_graphs=mode in ("graphs", "max"))
    want_losses, want_correct, want_weights = train(models, eager_cfg, lrs)
    losses, correct, weights = train(models, cfg, lrs)
    loss_rtol, weight_rtol = (2e-2, 5e-2) if amp else (1e-3, 1e-2)
    assert losses == pytest.approx(want_losses, rel=loss_rtol)
    assert sum(abs(a - b) for a, b in zip(correct, want_correct, strict=True)) <= 2  # argmax ties may flip
    assert relative_error(weights, want_weights) < weight_rtol
    assert len(losses) == 12 > 2 * WARMUP_STEPS  # graphs were replayed, not only warmed up


def test_cuda_graphs_step_without_logits(models):
    losses, correct, _ = train(models, config(channels_last=True, cuda_graphs=True), [0.1, 0.1, 0.01],
                               no_logits=True)
    want_losses, _, _ = train(models, config(channels_last=True), [0.1, 0.1, 0.01], no_logits=True)
    assert correct == [None] * 12
    assert losses == pytest.approx(want_losses, rel=1e-3)


def test_stage_script_with_cuda_graphs_matches_eager(tiny_npz, tmp_path):
    """Three epochs with a partial last batch and an LR milestone through train_teacher.py: graphs then eager."""
    common = ["--model", "res8", "--dataset", str(tiny_npz), "--epochs", "3", "--schedule", "2", "--batch_size",
              "100", "--gpu_id", "0", "--amp", "off"]
    graphed = train_teacher.main([*common, "--compile", "graphs", "--out_dir", str(tmp_path / "graphs")])
    eager = train_teacher.main([*common, "--compile", "off", "--out_dir", str(tmp_path / "eager")])
    assert graphed["config"]["cuda_graphs"] and not eager["config"]["cuda_graphs"]
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("graphs", "eager")}
    for got, want in zip(rows["graphs"], rows["eager"], strict=True):
        assert got["lr"] == want["lr"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-3)
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-2)


# ------------------------------------------------------------------------------------- whole stages


def test_three_stages_on_synthetic(tmp_path):
    """Teacher, heads, and DIH/KD/CE students on the built-in synthetic set with the GPU defaults (in this process:
    the scripts' command lines are the CPU tests' business)."""
    common = ["--dataset", "synthetic", "--epochs", "2", "--schedule", "1", "--lr", "0.05", "--gpu_id", "0"]
    teacher = tmp_path / "teacher" / "teacher.pt"
    summaries = {"teacher": train_teacher.main(["--model", "res20", *common, "--out_dir", str(teacher.parent)]),
                 "heads": train_heads.main(["--teacher", "res20", "--teacher_ckpt", str(teacher), *common,
                                            "--out_dir", str(tmp_path / "heads")])}
    for method in ("dih", "kd", "ce"):
        inputs = [] if method == "ce" else ["--teacher", "res20", "--teacher_ckpt", str(teacher)]
        inputs += ["--heads_ckpt", str(tmp_path / "heads" / "heads.pt")] if method == "dih" else []
        summaries[method] = test_dih.main(["--method", method, "--student", "res8", *inputs, *common, "--out_dir",
                                           str(tmp_path / method)])
    for run, summary in summaries.items():
        assert summary["config"]["channels_last"], run
        assert summary["final_test_acc"] > 25.0, (run, summary["final_test_acc"])  # chance: 10%


@pytest.mark.parametrize("mode", ["off", "graphs"])
def test_a_group_trains_what_its_students_alone_train(tiny_npz, tmp_path, mode):
    """KD, CRD and DIH as one group and each alone, eager and replayed from CUDA graphs (the teacher pass and each
    student's step are graphs of their own, CRD's random stream swapped in between replays): the same losses and
    accuracies, within the kernels' run-to-run noise."""
    common = ["--dataset", str(tiny_npz), "--epochs", "2", "--schedule", "1", "--gpu_id", "0", "--batch_size", "16"]
    teacher = tmp_path / "teacher" / "teacher.pt"
    train_teacher.main(["--model", "res8", *common, "--out_dir", str(teacher.parent)])
    train_heads.main(["--teacher", "res8", "--teacher_ckpt", str(teacher), *common, "--out_dir", str(tmp_path / "h")])
    inputs = ["--teacher", "res8", "--teacher_ckpt", str(teacher), "--heads_ckpt", str(tmp_path / "h" / "heads.pt"),
              "--nce_k", "64", "--compile", mode, *common]
    methods = ["kd", "crd", "dih"]
    grouped = test_dih.main(["--method", *methods, *inputs,
                             *(flag for m in methods for flag in (f"--{m}.out_dir", str(tmp_path / "group" / m)))])
    for method in methods:
        alone = test_dih.main(["--method", method, *inputs, "--out_dir", str(tmp_path / "alone" / method)])
        rows = [[json.loads(line) for line in (tmp_path / kind / method / "metrics.jsonl").read_text().splitlines()]
                for kind in ("group", "alone")]
        assert [r["train_loss"] for r in rows[0]] == pytest.approx([r["train_loss"] for r in rows[1]], rel=1e-2)
        assert abs(grouped[method]["final_test_acc"] - alone["final_test_acc"]) <= 2.0, method


def test_reproduce_demo(tmp_path):
    result = run_script("reproduce.py", "--preset", "demo", "--jobs", "6", "--gpus", "0", "--runs_dir",
                        str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results"), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "results").rglob("results.md")), result.stdout[-2000:]


# --------------------------------------------------------------------------------------------- resume


def test_killed_run_resumes_within_run_to_run_noise(tiny_npz, tmp_path):
    """Not bit-identical on a GPU (autotuning picks kernels per process): the resumed run may differ from an
    uninterrupted one no more than a second uninterrupted run does (x4), or 1e-2 relative, whichever is larger."""
    common = [str(ROOT / "train_teacher.py"), "--model", "res8", "--dataset", str(tiny_npz), "--epochs", "4",
              "--schedule", "2", "--gpu_id", "0", "--batch_size", "16"]  # 16 steps an epoch: time to kill it
    for name in ("whole", "again"):
        assert run_script(*common, "--out_dir", str(tmp_path / name)).returncode == 0
    # The GPU's environment is kept (unlike the CPU tests' bare one).
    kill_after_epochs([*common, "--out_dir", str(tmp_path / "cut")], tmp_path / "cut",
                      env={**os.environ, "PYTHONPATH": str(ROOT)})
    resumed = run_script(*common, "--out_dir", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr

    def weights(name: str) -> dict[str, torch.Tensor]:
        state = torch.load(tmp_path / name / "teacher.pt", weights_only=True)["state_dict"]
        return {k: v for k, v in state.items() if v.is_floating_point()}

    def losses(name: str) -> list[float]:
        return [json.loads(line)["train_loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    noise = relative_error(weights("again"), weights("whole"))
    assert relative_error(weights("cut"), weights("whole")) <= max(4 * noise, 1e-2)
    loss_noise = max(abs(a - b) / b for a, b in zip(losses("again"), losses("whole"), strict=True))
    assert losses("cut") == pytest.approx(losses("whole"), rel=max(4 * loss_noise, 1e-2))


# ----------------------------------------------------------------------------------------------- memory


def test_out_of_memory_is_one_line():
    code = "import cli, torch; cli.main_guard(lambda argv: torch.empty(1 << 50, device='cuda'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert_clean_failure(result, "out of GPU memory", "--batch_size")


def test_out_of_memory_in_a_stage_script_is_one_line(tiny_npz, tmp_path):
    """A real stage run that cannot fit: the GPU's memory capped to a sliver for this process."""
    code = ("import sys, torch, train_teacher, cli; torch.cuda.set_per_process_memory_fraction(0.0005); "
            f"sys.argv = ['train_teacher.py', '--model', 'wrn_40_2', '--dataset', {str(tiny_npz)!r}, '--epochs', '1', "
            f"'--batch_size', '256', '--gpu_id', '0', '--out_dir', {str(tmp_path / 'run')!r}]; "
            "cli.main_guard(train_teacher.main)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert_clean_failure(result, "out of GPU memory")
