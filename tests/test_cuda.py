"""The CUDA paths, on the GPU named by DIH_TEST_DEVICE (default cuda:0; cuda:1 tests index 1 of a multi-GPU machine).
Skipped without it; `make gpu-check` runs them (`pytest -m cuda`), most telling first: the device, every method under
CUDA graphs, resume, then the stages and, last and slowest, every method under torch.compile and the demo.

Bounds. Two eager runs on a GPU may already differ (cuDNN autotuning picks kernels per process, convolutions run in
TF32, some backward kernels use atomics), so a variant (CUDA graphs, torch.compile, a resumed run) is compared with
eager relative to a measured eager-vs-eager spread of the very same run: at most 4x that spread, or a floor of 1% (2%
for torch.compile, which fuses and so rounds differently) of the distance the weights travelled in the run, whichever
is larger. Each bound is checked to stay at or below 10% of that distance (one LR phase's update, nearly: two epochs
at lr 0.1, one at 0.01): a step that were skipped, replayed stale or fed the wrong batch would move the weights
by a sizeable part of an update, and fail.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    Interrupted,
    assert_clean_failure,
    assert_resumed,
    kill_after_epochs,
    metrics_lines,
    run_script,
    stop_after_first_epoch,
)
from helpers import TOLERANCE, build_stage, fast, random_dataset, reference, relative_error

import cli
import engine
import test_dih
import train_heads
import train_teacher
from benchmarks import harness, measures
from cuda_graphs import WARMUP_STEPS
from data import train_batches
from engine import TrainConfig, fit, make_optimizer, make_train_step, trainable_parameters
from heads import heads_for
from methods import METHODS
from models import build_model
from random_streams import restore_random_state, run_generators, save_random_state

DEVICE = torch.device(os.environ.get("DIH_TEST_DEVICE") or "cuda:0")
GPU_ID = str(DEVICE)
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type != "cuda" or not torch.cuda.is_available()
                       or (DEVICE.index or 0) >= torch.cuda.device_count(),
                       reason=f"needs the CUDA GPU {DEVICE} (DIH_TEST_DEVICE): run by make gpu-check"),
]

NUM_CLASSES, BATCH = 10, 16
# fp32 on CUDA: convolutions in TF32 (10 mantissa bits) against the CPU's fp32. bf16: test_fast_path's bounds.
CUDA_TOLERANCE = {False: (2e-3, 2e-2), True: TOLERANCE[True]}
SPREAD_FACTOR, FLOOR, COMPILE_FLOOR, CEILING = 4.0, 0.01, 0.02, 0.1  # see the module docstring


@pytest.fixture(autouse=True)
def current_device():
    """The tests' GPU is the current one, as the stage scripts make it (cli.parse)."""
    torch.cuda.set_device(DEVICE)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def assert_within_spread(variant: dict, eager: dict, again: dict, initial: dict, floor: float = FLOOR) -> None:
    """`variant`'s final weights within the eager-vs-eager spread of the same run (see the module docstring)."""
    travelled = relative_error(eager, initial)
    spread = relative_error(again, eager)
    bound = max(SPREAD_FACTOR * spread, floor * travelled)
    assert bound <= CEILING * travelled, f"eager runs differ by {spread:.2e}, the run moves {travelled:.2e}"
    error = relative_error(variant, eager)
    assert error <= bound, f"{error:.2e} from eager; bound {bound:.2e} (spread {spread:.2e}, moved {travelled:.2e})"


def test_default_device_is_the_first_gpu_with_bf16_channels_last_and_autotuning():
    _, device, cfg = cli.parse(cli.common_parser(""), [])
    assert device == torch.device("cuda:0")
    assert cfg.amp == torch.cuda.is_bf16_supported(including_emulation=False)
    assert cfg.channels_last and not cfg.compile and not cfg.cuda_graphs
    assert torch.backends.cudnn.benchmark


def test_the_runs_gpu_becomes_the_current_device():
    torch.cuda.set_device(0)
    _, device, _ = cli.parse(cli.common_parser(""), ["--gpu_id", GPU_ID])
    assert device == DEVICE and torch.cuda.current_device() == DEVICE.index


# ------------------------------------------------------------------------ every method, eager and graphed


HYPER = {"crd": {"nce_k": 16}, "fitnets": {"hint_epochs": 1}}
METHOD_NAMES = [name for name in METHODS if name != "ce"] + ["ce"]


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": BATCH, "lr": 0.1, "momentum": 0.9, "wd": 5e-4, "nesterov": True,
                          "schedule": (2,), "gamma": 0.1, "seed": 0, "channels_last": True, **overrides})


@functools.cache
def train(method: str, amp: bool = False, compile: bool = False, graphs: bool = False, run: int = 0
          ) -> tuple[list[dict], dict, dict]:
    """engine.fit of `method` on 53 random images (3 full batches of 16 and a partial one of 5 an epoch), three epochs
    at lr 0.1, 0.1, 0.01 (FitNets: a hint epoch first, each phase with its own optimizer and graphs), starting from the
    same weights and random state each time: its metrics rows, and the student's weights before and after (not the
    extras: CRD's memory banks, renormalised from random, would swamp the distance travelled). `run` only tells
    repeated runs apart (the eager spread)."""
    stage = build_stage(method, DEVICE, n=53, size=32, channels_last=True, **HYPER.get(method, {}))
    initial = weights(stage.model)
    out = Path(tempfile.mkdtemp(prefix=f"dih-cuda-{method}-"))
    torch.manual_seed(1)  # CRD's negatives, on this GPU's generator
    dataset = random_dataset(DEVICE, 53, 32)  # the images build_stage gave the stage
    fit(stage, dataset, config(amp=amp, compile=compile, cuda_graphs=graphs), out, {}, log=lambda line: None)
    rows = [json.loads(line) for line in metrics_lines(out)]
    return rows, initial, weights(stage.model)


def expected_counts(method: str) -> list[dict[str, int]]:
    """Per epoch (shapes 16, 16, 16, 5): the full shape warms up twice and is captured at its third step; the partial
    one warms up in epochs 1 and 2 and is captured in epoch 3, where the LR drop recaptures the full one too."""
    assert WARMUP_STEPS == 2
    phase = [{"steps": 4, "warmups": 3, "captures": 1, "replays": 1},
             {"steps": 4, "warmups": 1, "captures": 0, "replays": 3},
             {"steps": 4, "warmups": 0, "captures": 2, "replays": 4}]
    return ([{"steps": 4, "warmups": 3, "captures": 1, "replays": 1}] if method == "fitnets" else []) + phase


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_under_cuda_graphs_is_captured_replayed_and_equals_eager(method, amp):
    """CRD's sampling and memory update inside the graph, TOFD's temperature tensor (another value each epoch),
    FitNets' phase switch (a new optimizer, a new graph), MHKD's teacher heads: the counts say the graphs ran,
    every step after the warm-ups a replay; the weights stay within the eager spread."""
    rows, initial, graphed = train(method, amp=amp, graphs=True)
    assert [row["cuda_graphs"] for row in rows] == expected_counts(method)
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in rows)
    _, _, eager = train(method, amp=amp)
    _, _, again = train(method, amp=amp, run=1)
    assert_within_spread(graphed, eager, again, initial)


def test_teacher_and_heads_stages_under_cuda_graphs_equal_eager(tiny_npz, tmp_path):
    """Through the stage scripts: three epochs of 256 images in batches of 100 (a partial batch of 56) with an LR
    drop; every step after the warm-ups replayed, the weights within the eager spread (heads: all on one teacher)."""
    common = ["--dataset", str(tiny_npz), "--epochs", "3", "--schedule", "2", "--batch_size", "100", "--gpu_id",
              GPU_ID, "--amp", "off"]
    runs = {"graphs": "graphs", "eager": "off", "again": "off"}
    for run, mode in runs.items():
        train_teacher.main(["--model", "res8", *common, "--compile", mode, "--out_dir",
                            str(tmp_path / run / "teacher")])
    for run, mode in runs.items():
        train_heads.main(["--teacher", "res8", "--teacher_ckpt", str(tmp_path / "eager" / "teacher" / "teacher.pt"),
                          *common, "--compile", mode, "--out_dir", str(tmp_path / run / "heads")])
    torch.manual_seed(30)  # as the scripts build them: the teacher; then, the teacher built, the heads
    teacher = build_model("res8", 10)
    initial = {"teacher": weights(teacher)}
    torch.manual_seed(30)
    initial["heads"] = weights(heads_for(teacher, 10, 32))
    for kind in ("teacher", "heads"):
        counts = [json.loads(line)["cuda_graphs"] for line in metrics_lines(tmp_path / "graphs" / kind)]
        assert all(c["replays"] == c["steps"] - c["warmups"] for c in counts), counts
        assert sum(c["captures"] for c in counts) >= 2 and sum(c["replays"] for c in counts) >= 3, counts
        final = {run: {k: v.float() for k, v in torch.load(tmp_path / run / kind / f"{kind}.pt", weights_only=True)[
            "state_dict"].items() if v.is_floating_point()} for run in runs}
        assert_within_spread(final["graphs"], final["eager"], final["again"], initial[kind])


def losses_at_lr_zero(method: str, before_step, graphs: bool, steps: int = 5, **hyper) -> list[float]:
    """The loss of `steps` steps on one batch at lr 0 (the weights stay), `before_step(stage, i)` before step i."""
    stage = build_stage(method, DEVICE, n=53, size=32, channels_last=True, **hyper)
    stage.trainable.train()
    cfg = dataclasses.replace(config(cuda_graphs=graphs), lr=0.0)
    step = make_train_step(lambda b, shared: stage.training_loss(b),  # the teacher's pass inside the step (graph)
                           make_optimizer(trainable_parameters(stage.trainable), cfg), cfg)
    dataset = random_dataset(DEVICE, 53, 32)  # the images build_stage gave the stage
    batch = next(train_batches(dataset, BATCH, torch.Generator(device=DEVICE).manual_seed(0), True))
    torch.manual_seed(1)
    losses = []
    for i in range(steps):
        before_step(stage, i)
        losses.append(step(batch)[0].item())
    return losses


@pytest.mark.parametrize(("method", "before_step"), [
    ("tofd", lambda stage, i: stage.start_epoch(1 + 100 * i)),  # T_e = 1.012, 2.212, ... 5.812: read, not baked in
    ("crd", lambda stage, i: None),  # fresh negatives and a bank update at every replay
], ids=["tofd-temperature", "crd-sampling-and-banks"])
def test_graph_replays_read_what_changes_between_steps(method, before_step):
    """Two warm-ups, a capture, two more replays, on one batch: each replay's loss is the eager step's, though what
    it reads (TOFD's temperature tensor, CRD's random negatives and memory banks) changed since the capture. Bound:
    a tenth of the smallest change from one eager step to the next (the forward kernels are the same: measured on
    the CPU, the eager steps differ by 2.4e-3 and more for TOFD, 1.5e-2 for CRD)."""
    graphed = losses_at_lr_zero(method, before_step, graphs=True, **HYPER.get(method, {}))
    eager = losses_at_lr_zero(method, before_step, graphs=False, **HYPER.get(method, {}))
    gaps = [abs(a - b) for a, b in zip(eager, eager[1:], strict=False)]
    assert min(gaps) > 0 and max(abs(g - e) for g, e in zip(graphed, eager, strict=True)) <= 0.1 * min(gaps), (
        graphed, eager)


# --------------------------------------------------------------------------------------------- resume


def test_killed_run_resumes_within_the_eager_spread(tiny_npz, tmp_path):
    """Not bit-identical on a GPU (autotuning picks kernels per process): SIGKILLed after epoch 1 and resumed, the
    run trains epochs 2-4 only and ends within the spread of two uninterrupted runs."""
    common = [str(ROOT / "train_teacher.py"), "--model", "res8", "--dataset", str(tiny_npz), "--epochs", "4",
              "--schedule", "2", "--gpu_id", GPU_ID, "--batch_size", "16"]  # 16 steps an epoch: time to kill it
    for name in ("whole", "again"):
        assert run_script(*common, "--out_dir", str(tmp_path / name)).returncode == 0
    kill_after_epochs([*common, "--out_dir", str(tmp_path / "cut")], tmp_path / "cut",
                      env={**os.environ, "PYTHONPATH": str(ROOT)})  # the GPU's environment, not the CPU tests' bare one
    before = metrics_lines(tmp_path / "cut")
    resumed = run_script(*common, "--out_dir", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_resumed(tmp_path / "cut", before, resumed.stdout)
    assert "reseeded" not in resumed.stdout  # the same GPU: the random stream carries over

    def final(name: str) -> dict[str, torch.Tensor]:
        state = torch.load(tmp_path / name / "teacher.pt", weights_only=True)["state_dict"]
        return {k: v.float() for k, v in state.items() if v.is_floating_point()}

    torch.manual_seed(30)  # the run's seed: its initial weights, as train_teacher.py builds them
    initial = weights(build_model("res8", 10))
    assert_within_spread(final("cut"), final("whole"), final("again"), initial)


def test_random_state_on_the_gpu_carries_to_another_index_and_reseeds_from_the_cpu():
    """A GPU generator's (seed, offset) restored into another GPU's generator continues its stream: the same draws.
    A CPU run's state on the GPU is reseeded with one notice (tests/test_resume.py has the CPU's side)."""
    data = torch.Generator(device=DEVICE).manual_seed(5)
    written = run_generators(data)
    torch.rand(3, device=DEVICE, generator=data)
    torch.rand(3, device=DEVICE)
    saved = save_random_state(written)
    saved["rng_device"] = f"cuda:{(DEVICE.index or 0) + 1}"  # as a run on the next GPU (absent here or not) wrote it
    want = torch.rand(4, device=DEVICE, generator=data), torch.rand(4, device=DEVICE)
    resumed, notices = run_generators(torch.Generator(device=DEVICE).manual_seed(99)), []
    restore_random_state(saved, resumed, reseed=1, log=notices.append)
    got = torch.rand(4, device=DEVICE, generator=resumed["data_rng"]), torch.rand(4, device=DEVICE)
    assert notices == [] and all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    cpu = save_random_state(run_generators(torch.Generator().manual_seed(5)))
    restore_random_state(cpu, run_generators(torch.Generator(device=DEVICE)), reseed=1, log=notices.append)
    assert len(notices) == 1 and f"interrupted on cpu, it continues on {DEVICE}" in notices[0]


def test_a_cpu_runs_last_pt_resumes_on_the_gpu_with_one_notice(tiny_npz, tmp_path, monkeypatch):
    common = ["--model", "res8", "--dataset", str(tiny_npz), "--epochs", "2", "--amp", "off", "--batch_size", "64",
              "--out_dir", str(tmp_path)]
    with monkeypatch.context() as patch:
        patch.setattr(train_teacher, "fit", lambda *args, **kw: engine.fit(*args, **kw, log=stop_after_first_epoch))
        with pytest.raises(Interrupted):
            train_teacher.main([*common, "--gpu_id", "cpu"])
    result = run_script("train_teacher.py", *common, "--gpu_id", GPU_ID, "--resume")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("reseeded") == 1 and "interrupted on cpu" in result.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 2


# ------------------------------------------------------------------------------------------------ memory


def test_out_of_memory_is_one_line():
    code = f"import cli, torch; cli.main_guard(lambda argv: torch.empty(1 << 50, device={GPU_ID!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert_clean_failure(result, "out of GPU memory", "--batch_size")


def test_out_of_memory_in_a_stage_script_is_one_line(tiny_npz, tmp_path):
    """A real stage run that cannot fit: the GPU's memory capped to a sliver for this process."""
    code = (f"import sys, torch, train_teacher, cli; torch.cuda.set_per_process_memory_fraction(0.0005, {GPU_ID!r}); "
            f"sys.argv = ['train_teacher.py', '--model', 'wrn_40_2', '--dataset', {str(tiny_npz)!r}, '--epochs', '1', "
            f"'--batch_size', '256', '--gpu_id', {GPU_ID!r}, '--out_dir', {str(tmp_path / 'run')!r}]; "
            "cli.main_guard(train_teacher.main)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert_clean_failure(result, "out of GPU memory")


# ------------------------------------------------------------------------------ steps against the CPU


@pytest.fixture(scope="module")
def models() -> harness.Models:
    return harness.make_models("res8", "res8", NUM_CLASSES)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", harness.STAGES)
def test_cuda_step_equals_the_cpu_fp32_step(kind, amp, models, batch):
    """channels_last, with and without bf16 autocast, on the GPU: the loss and gradients of the plain CPU step."""
    cfg = dataclasses.replace(config(amp=amp), lr=0.0)
    loss, grads = fast(kind, models, *batch, cfg, device=DEVICE)
    want_loss, want_grads = reference(kind, models, *batch)
    loss_rtol, grad_rtol = CUDA_TOLERANCE[amp]
    assert loss == pytest.approx(want_loss, rel=loss_rtol)
    assert relative_error({k: g.cpu() for k, g in grads.items()}, want_grads) < grad_rtol


@pytest.mark.parametrize("kind", harness.STAGES)
def test_bench_paths_agree_on_cuda(kind):
    plan = harness.Plan(warmup=0, steps=1, repeats=1)
    _, _, cfg = cli.parse(cli.common_parser(""), ["--batch_size", str(BATCH), "--gpu_id", GPU_ID])
    work = measures.Workload.build("res8", "res8", NUM_CLASSES, cfg, DEVICE, plan)
    fast_loss, conventional_loss, ok = work.check(work.fast_step(kind), work.conventional_step(kind))
    assert ok, (fast_loss, conventional_loss)


# ------------------------------------------------------------------------------------- whole stages


def test_three_stages_on_synthetic(tmp_path):
    """Teacher, heads, and DIH/KD/CE students on the built-in synthetic set with the GPU defaults (in this process:
    the scripts' command lines are the CPU tests' and the smoke part's business)."""
    common = ["--dataset", "synthetic", "--epochs", "2", "--schedule", "1", "--lr", "0.05", "--gpu_id", GPU_ID]
    teacher = tmp_path / "teacher" / "teacher.pt"
    summaries = {"teacher": train_teacher.main(["--model", "res20", *common, "--out_dir", str(teacher.parent)]),
                 "heads": train_heads.main(["--teacher", "res20", "--teacher_ckpt", str(teacher), *common,
                                            "--out_dir", str(tmp_path / "heads")])}
    for method in ("dih", "kd", "ce"):
        inputs = [] if method == "ce" else ["--teacher", "res20", "--teacher_ckpt", str(teacher)]
        inputs += ["--heads_ckpt", str(tmp_path / "heads" / "heads.pt")] if method == "dih" else []
        summaries[method] = test_dih.main(["--method", method, "--student", "res8", *inputs, *common, "--out_dir",
                                           str(tmp_path / method)])[method]
    for run, summary in summaries.items():
        assert summary["config"]["channels_last"], run
        assert summary["final_test_acc"] > 25.0, (run, summary["final_test_acc"])  # chance: 10%


@pytest.mark.parametrize("mode", ["off", "graphs"])
def test_a_group_trains_what_its_students_alone_train(tiny_npz, tmp_path, mode):
    """KD, CRD and DIH as one group and each alone, eager and replayed from CUDA graphs (the teacher pass and each
    student's step are graphs of their own, CRD's random stream swapped in between replays): the same losses and
    accuracies, within the kernels' run-to-run noise."""
    common = ["--dataset", str(tiny_npz), "--epochs", "2", "--schedule", "1", "--gpu_id", GPU_ID, "--batch_size", "16"]
    teacher = tmp_path / "teacher" / "teacher.pt"
    train_teacher.main(["--model", "res8", *common, "--out_dir", str(teacher.parent)])
    train_heads.main(["--teacher", "res8", "--teacher_ckpt", str(teacher), *common, "--out_dir", str(tmp_path / "h")])
    inputs = ["--teacher", "res8", "--teacher_ckpt", str(teacher), "--heads_ckpt", str(tmp_path / "h" / "heads.pt"),
              "--nce_k", "64", "--compile", mode, *common]
    methods = ["kd", "crd", "dih"]
    grouped = test_dih.main(["--method", *methods, *inputs,
                             *(flag for m in methods for flag in (f"--{m}.out_dir", str(tmp_path / "group" / m)))])
    for method in methods:
        alone = test_dih.main(["--method", method, *inputs, "--out_dir", str(tmp_path / "alone" / method)])[method]
        rows = [[json.loads(line) for line in (tmp_path / kind / method / "metrics.jsonl").read_text().splitlines()]
                for kind in ("group", "alone")]
        assert [r["train_loss"] for r in rows[0]] == pytest.approx([r["train_loss"] for r in rows[1]], rel=1e-2)
        assert abs(grouped[method]["final_test_acc"] - alone["final_test_acc"]) <= 2.0, method


# ------------------------------------------------------------------ torch.compile (slowest: compiles each)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_under_torch_compile_equals_eager(method):
    """fp32: fused kernels round differently, so the floor is 2% of the distance travelled (bf16 would move the
    rounding points themselves; the smoke part runs it)."""
    rows, initial, compiled = train(method, compile=True)
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in rows) and "cuda_graphs" not in rows[0]
    _, _, eager = train(method)
    _, _, again = train(method, run=1)
    assert_within_spread(compiled, eager, again, initial, floor=COMPILE_FLOOR)


def test_compile_and_graphs_together(tmp_path):
    rows, initial, both = train("dih", compile=True, graphs=True)
    assert [row["cuda_graphs"] for row in rows] == expected_counts("dih")
    _, _, eager = train("dih")
    _, _, again = train("dih", run=1)
    assert_within_spread(both, eager, again, initial, floor=COMPILE_FLOOR)


def test_reproduce_demo(tmp_path):
    result = run_script("reproduce.py", "--preset", "demo", "--jobs", "6", "--gpus", str(DEVICE.index or 0),
                        "--runs_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results"), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "results").rglob("results.md")), result.stdout[-2000:]
