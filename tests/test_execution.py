"""How the steps run: the device's execution choice, CUDA-graph bookkeeping (with faked CUDA), help texts, pipes.

The CUDA paths themselves are exercised by tests/test_cuda.py on a GPU (make gpu-check); here, everything around
them that a CPU can check.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_clean_failure, run_script
from helpers import FakeCuda, parsers_and_help
from torch import nn

import benchmarks.main as bench
import cli
import engine
import train_teacher
from cuda_graphs import WARMUP_STEPS, GraphedStep
from data import Batch
from engine import TrainConfig, make_optimizer, make_train_step
from execution import choose_execution, cpu_flags, native_bf16
from utils import UserError

CPU, CUDA = torch.device("cpu"), torch.device("cuda:0")


# ------------------------------------------------------------------------------------- execution choice


@pytest.mark.parametrize("native,capability,channels_last", [
    (True, "AVX512", True), (False, "AVX512", True), (False, "AVX2", True), (False, "DEFAULT", False),
    (True, "SVE256", False), (False, "NO AVX", False)])
def test_cpu_auto_amp_follows_native_bf16_and_channels_last_the_measured_cpus(native, capability, channels_last):
    auto = choose_execution(CPU, "auto", "auto", native_bf16=native, cpu_capability=capability)
    assert (auto.amp, auto.channels_last, auto.compile, auto.cuda_graphs) == (native, channels_last, False, False)
    assert choose_execution(CPU, "on", "off", native_bf16=native, cpu_capability=capability).amp
    assert not choose_execution(CPU, "off", "on", native_bf16=native, cpu_capability=capability).amp
    assert choose_execution(CPU, "off", "on", native_bf16=native, cpu_capability=capability).compile


@pytest.mark.parametrize("bf16", [True, False])
def test_cuda_auto_amp_follows_the_gpu(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    auto = choose_execution(CUDA, "auto", "auto", native_bf16=False, cpu_capability="DEFAULT")
    assert (auto.amp, auto.channels_last, auto.compile, auto.cuda_graphs) == (bf16, True, False, False)
    modes = {mode: choose_execution(CUDA, "auto", mode, native_bf16=False, cpu_capability="DEFAULT")
             for mode in ("off", "on", "graphs", "max")}
    assert {mode: (e.compile, e.cuda_graphs) for mode, e in modes.items()} == {
        "off": (False, False), "on": (True, False), "graphs": (False, True), "max": (True, True)}


def test_the_runs_gpu_becomes_the_current_device(monkeypatch):
    """--gpu_id 1 on a (faked) 2-GPU machine: cuda:1 is made current, so that CUDA graphs' streams and capture and
    every torch.cuda call without a device act on it; bench.py takes the same path. The CPU sets nothing."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    _, device, _ = cli.parse(cli.common_parser(""), ["--gpu_id", "1"])
    assert device == torch.device("cuda:1") and current == [device]
    assert bench.engine_config(bench.parse_args(["--gpu_id", "cuda:1"]))[0] == device and current == [device] * 2
    cli.parse(cli.common_parser(""), ["--gpu_id", "cpu"])
    assert current == [device] * 2


@pytest.mark.parametrize("mode", ["graphs", "max"])
def test_cuda_graphs_on_the_cpu_are_a_user_error(mode):
    with pytest.raises(UserError, match=f"--compile {mode}.*GPU"):
        choose_execution(CPU, "auto", mode, native_bf16=True, cpu_capability="AVX512")


def test_native_bf16_needs_every_available_source_to_agree(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\nprocessor\t: 1\n"
                       "flags\t\t: fpu sse2 avx512f avx512_bf16\n")
    flags = cpu_flags(cpuinfo)
    assert flags == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") is None
    assert native_bf16(flags, True) and native_bf16(flags, None) and native_bf16(None, True)
    assert not native_bf16(flags, False)  # the two sources disagree: fp32, the safe side
    assert not native_bf16({"fpu", "avx512f"}, None) and not native_bf16(None, None)
    assert native_bf16({"amx_bf16"}, None)


# ----------------------------------------------------------------------------- CUDA graphs, faked




def tiny_setup(no_logits: bool = False):
    """A linear classifier on 3x4x4 inputs, its SGD and the engine's eager step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1, momentum=0.9, wd=5e-4, nesterov=True, schedule=(), gamma=0.1,
                      seed=0)
    optimizer = make_optimizer(model.parameters(), cfg)

    def loss_fn(batch, shared=None):
        logits = model(batch.x)
        return F.cross_entropy(logits, batch.y), [] if no_logits else [logits]

    return model, optimizer, make_train_step(loss_fn, optimizer, cfg)


def batches(sizes: list[int]) -> list[Batch]:
    gen = torch.Generator().manual_seed(1)
    return [Batch(torch.randn(n, 3, 4, 4, generator=gen), torch.randint(0, 5, (n,), generator=gen),
                  torch.arange(n)) for n in sizes]


@pytest.mark.parametrize("no_logits", [False, True])
def test_graphed_step_bookkeeping_warms_captures_per_shape_recaptures_on_lr_and_counts(no_logits):
    """Two epochs of 3 full batches and a partial one, the LR dropping between them, then a third epoch.

    Bookkeeping only: the fake replay runs the eager step itself, so "graphed equals eager" here is true by
    construction and is NO evidence that a real CUDA graph computes what the eager step does (tests/test_cuda.py
    checks that on a GPU). What it does check: which steps warm up, when a shape is (re)captured, that each batch
    reaches the static inputs and the outputs are copied out of the static ones, and the counts fit records."""
    sizes = [8, 8, 8, 3]
    lrs = [0.1, 0.1, 0.01]
    eager_model, eager_opt, eager = tiny_setup(no_logits)
    graphed_model, graphed_opt, inner = tiny_setup(no_logits)
    fake = FakeCuda(graphed_opt, no_logits)
    graphed = GraphedStep(inner, graphed_opt, warm=fake.warm, capture=fake.capture)
    for lr in lrs:
        for group in [*eager_opt.param_groups, *graphed_opt.param_groups]:
            group["lr"] = lr
        for batch in batches(sizes):
            want, got = eager(batch), graphed(batch)
            assert torch.equal(want[0], got[0])
            assert (got[1] is None) if no_logits else torch.equal(want[1], got[1])
    assert all(torch.equal(a, b) for a, b in zip(eager_model.state_dict().values(),
                                                 graphed_model.state_dict().values(), strict=True))
    # Warm-up: WARMUP_STEPS eager steps of each shape, never again; the partial batch comes once per epoch.
    assert fake.warmed == [(8, 3, 4, 4)] * WARMUP_STEPS + [(3, 3, 4, 4)] * WARMUP_STEPS
    # Capture: the full batch in epoch 1; after the LR drop (epoch 3) the full batch again, with the new LR baked
    # in, and the partial one at its third appearance.
    assert fake.captured == [((8, 3, 4, 4), 0.1), ((8, 3, 4, 4), 0.01), ((3, 3, 4, 4), 0.01)]
    # The counts: every step that is not a warm-up is a replay; reading them starts the next tally.
    steps = len(lrs) * len(sizes)
    assert graphed.take_counts() == {"warmups": 2 * WARMUP_STEPS, "captures": 3, "replays": steps - 2 * WARMUP_STEPS}
    assert graphed.take_counts() == {"warmups": 0, "captures": 0, "replays": 0}


def test_graphed_step_outputs_are_copies_of_the_static_ones():
    """A caller accumulating the returned loss must not see it change at the next replay."""
    _, optimizer, inner = tiny_setup()
    fake = FakeCuda(optimizer)
    graphed = GraphedStep(inner, optimizer, warm=fake.warm, capture=fake.capture)
    losses = [graphed(batch)[0] for batch in batches([8] * (WARMUP_STEPS + 3))]
    assert len({float(loss) for loss in losses[WARMUP_STEPS:]}) == 3  # three replays, three losses kept


def test_a_step_that_cannot_be_captured_is_a_user_error():
    _, optimizer, inner = tiny_setup()

    def capture(step, static):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    graphed = GraphedStep(inner, optimizer, warm=lambda step, inputs: step(*inputs), capture=capture)
    with pytest.raises(UserError, match="cannot be captured as a CUDA graph \\(operation not permitted"):
        for batch in batches([8] * (WARMUP_STEPS + 1)):
            graphed(batch)


# --------------------------------------------------------------------------------------------- resume


def test_resume_refuses_a_change_of_precision(tiny_npz, tmp_path):
    common = ["--model", "res8", "--dataset", str(tiny_npz), "--epochs", "1", "--out_dir", str(tmp_path), "--gpu_id",
              "cpu", "--batch_size", "128"]
    train_teacher.main([*common, "--amp", "off"])
    (tmp_path / "summary.json").unlink()
    refusal = "trained in fp32, but here --amp on gives bf16 autocast; resume with --amp off"
    with pytest.raises(UserError, match=refusal):
        train_teacher.main([*common, "--amp", "on", "--resume"])
    train_teacher.main([*common, "--amp", "off", "--resume"])  # the same precision resumes
    assert (tmp_path / "summary.json").exists()


def test_out_of_memory_is_one_line(tiny_npz, tmp_path, monkeypatch, capsys):
    """A stage script's own path, its training step raising torch.OutOfMemoryError as CUDA's allocator does: one
    line on stderr that says what to do, exit 2, no traceback, no finished run."""
    def out_of_memory(*args, **kwargs):
        def step(batch, shared=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step

    monkeypatch.setattr(engine, "make_train_step", out_of_memory)
    monkeypatch.setattr(sys, "argv", ["train_teacher.py", "--model", "res8", "--dataset", str(tiny_npz), "--epochs",
                                      "1", "--gpu_id", "cpu", "--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main_guard(train_teacher.main)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["train_teacher.py: error: out of GPU memory; try a smaller --batch_size"]
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "last.pt").exists()


# ------------------------------------------------------------------------------------------------ help




def help_entries(text: str) -> dict[str, str]:
    """The help text of each option, by its first flag, lines joined."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        match = re.match(r"^  (-{1,2}[\w-]+)", line)
        if match:
            flag = match.group(1)
            entries[flag] = line
        elif flag and line.startswith("   "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


def test_help_shows_each_default_once(monkeypatch, capsys):
    for script, (parser, text) in parsers_and_help(monkeypatch, capsys).items():
        entries = help_entries(text)
        for action in parser._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS:
                continue
            entry = entries[action.option_strings[0]]
            assert entry.count("(default") <= 1, (script, entry)
            switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
            if action.default is not None and not switch:
                assert "(default: " in entry, (script, entry)
        assert "(default: None)" not in text, script


# --------------------------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("argv", [
    ["reproduce.py", "--preset", "paper-cifar100", "--dry_run"],
    ["bench.py", "--gpu_id", "cpu", "--stages", "dih", "--teacher", "res8", "--num_classes", "10", "--steps", "1"],
])
def test_a_reader_that_leaves_early_ends_the_script_quietly(argv):
    """As in `script | head -1`, with the reader gone before the first write: no traceback, the exit status of a
    tool killed by SIGPIPE."""
    proc = subprocess.Popen([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
                                                                    "PATH": "/usr/bin:/bin"})
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr, stderr


def test_missing_teacher_is_reported_before_any_data_with_the_command_making_it(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    result = run_script("train_heads.py", "--dataset", "cifar100", "--data_dir", str(data_dir), "--gpu_id", "cpu",
                        cwd=tmp_path)
    assert_clean_failure(result, "runs/cifar100/teacher-res110-seed30/teacher.pt",
                         "python3 train_teacher.py --model res110 --dataset cifar100 --seed 30")
    assert list(data_dir.iterdir()) == []
