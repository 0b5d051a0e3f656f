"""The fast path computes what a plain fp32 eager NCHW step computes: loss, gradients, cohort logits.

Every stage runs through the project's real step (`engine.GroupStep` on a run of the stages, as `fit` trains it) with
channels_last and/or bf16 autocast, and is compared with the step written out by hand below. The optimizer
runs with lr 0, so the gradients it leaves behind belong to the weights both computations started from.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from conftest import run_script
from helpers import TOLERANCE, fast, reference, relative_error
from torch import Tensor

import benchmarks.main as bench_cli
from benchmarks import harness, measures
from data import Batch
from engine import TrainConfig
from methods import METHODS, TeacherPass

NUM_CLASSES, BATCH = 10, 16
CPU = torch.device("cpu")
VARIANTS = {
    "channels_last": {"channels_last": True},
    "bf16": {"amp": True},
    "channels_last+bf16": {"channels_last": True, "amp": True},
}


@pytest.fixture(scope="module")
def models() -> harness.Models:
    """A small random-init teacher (BN-calibrated), its three heads and a student."""
    return harness.make_models("res8", "res8", NUM_CLASSES)


@pytest.fixture(scope="module")
def batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)


def config(**overrides: bool) -> TrainConfig:
    """The paper's optimiser with lr 0: the real step runs, but leaves the weights as they were."""
    return TrainConfig(epochs=1, batch_size=BATCH, lr=0.0, momentum=0.9, wd=5e-4, nesterov=True, schedule=(),
                       gamma=0.1, seed=0, **overrides)








@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", harness.STAGES)
def test_fast_step_equals_plain_fp32_step(kind, variant, models, batch):
    cfg = config(**VARIANTS[variant])
    loss, grads = fast(kind, models, *batch, cfg)
    want_loss, want_grads = reference(kind, models, *batch)
    loss_rtol, grad_rtol = TOLERANCE[cfg.amp]
    assert loss == pytest.approx(want_loss, rel=loss_rtol)
    assert relative_error(grads, want_grads) < grad_rtol


def test_compiled_step_equals_plain_fp32_step(models, batch):
    """torch.compile (inductor, C++ on the CPU) on the teacher stage: 25-35 s cold on 2 busy cores, then cached."""
    loss, grads = fast("teacher", models, *batch, config(compile=True))
    want_loss, want_grads = reference("teacher", models, *batch)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert relative_error(grads, want_grads) < 1e-4


@pytest.mark.parametrize("channels_last", [False, True])
def test_cohort_once_equals_teacher_and_each_head_separately(models, batch, channels_last):
    """One teacher pass (no_grad) gives the logits of teacher(x) and of each head on its own features; DIH reads
    nothing else of it."""
    stage = harness.fast_stage("dih", models, config(channels_last=channels_last), CPU)
    x = batch[0].contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    outputs = stage.shared_pass(Batch(x, batch[1], None), stage.needs)
    assert outputs.taps is None and outputs.pooled is None
    once = [outputs.logits, *outputs.heads]
    assert not any(logits.requires_grad for logits in once)

    teacher, heads = copy.deepcopy(models.teacher).eval(), copy.deepcopy(models.heads)
    features: list[Tensor] = []
    with torch.no_grad():
        final = teacher(batch[0])
        hooks = [stage.register_forward_hook(lambda _m, _i, out: features.append(out)) for stage in teacher.stages]
        teacher(batch[0])  # a second, separate pass for the features
        for hook in hooks:
            hook.remove()
        separately = [final, *(head(f.flatten(1)) for head, f in zip(heads.heads, features, strict=True))]
    assert len(once) == len(separately) == 1 + len(teacher.tap_names)
    for got, want in zip(once, separately, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def workloads() -> dict[str, measures.Workload]:
    plan = harness.Plan(warmup=0, steps=1, repeats=1)
    return {variant: measures.Workload.build("res8", "res8", NUM_CLASSES, config(**VARIANTS.get(variant, {})), CPU,
                                             plan)
            for variant in ("fp32", "channels_last+bf16")}


@pytest.mark.parametrize("variant", ["fp32", "channels_last+bf16"])
@pytest.mark.parametrize("kind", harness.STAGES)
def test_bench_paths_agree_on_a_batch(kind, variant, workloads):
    """bench.py's own check: its conventional foil and the fast path give one batch the same loss."""
    work = workloads[variant]
    fast_loss, conventional_loss, ok = work.check(work.fast_step(kind), work.conventional_step(kind))
    assert ok, (fast_loss, conventional_loss)


def test_bench_runs_and_ends_with_the_json_line():
    """The tiny end-to-end run: a table, then one JSON line with the keys the issue names."""
    result = run_script("bench.py", "--gpu_id", "cpu", "--stages", "dih", "--teacher", "res8", "--student", "res8",
                        "--num_classes", str(NUM_CLASSES), "--batch_size", str(BATCH),
                        "--steps", "1", "--warmup", "1", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(bench_cli.JSON_KEYS) <= set(record)
    assert record["stage"] == "dih" and record["batch_size"] == BATCH and record["device"].startswith("cpu")
    assert record["fast_img_s"] > 0 and record["conventional_img_s"] > 0
    assert record["loss_check"]["ok"]


DELAY = 1.0  # seconds a test adds to a step: far above what the step itself takes at batch 16, even on a loaded CPU


def slowed(call):
    """`call`, DELAY seconds slower."""

    def slow(*args, **kwargs):
        time.sleep(DELAY)
        return call(*args, **kwargs)

    return slow


def test_bench_reports_a_known_slowdown_of_the_conventional_step(monkeypatch, capsys):
    """The conventional step made DELAY slower: it can do BATCH / DELAY images a second at most, and the fast path,
    untouched, is the faster by the ratio (a timing that missed the step, or an inverted ratio, fails)."""
    real = measures.conventional_step
    monkeypatch.setattr(measures, "conventional_step", lambda *args: slowed(real(*args)))
    argv = ["--gpu_id", "cpu", "--stages", "heads", "--teacher", "res8", "--num_classes", str(NUM_CLASSES),
            "--batch_size", str(BATCH), "--steps", "1", "--warmup", "0", "--repeats", "1"]
    assert bench_cli.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["conventional_img_s"] <= BATCH / DELAY
    assert record["fast_img_s"] > BATCH / DELAY and record["ratio"] > 1.0


def test_bench_times_every_student_method_against_kd(capsys):
    """`--methods`: each method's own stage and step (its defaults), a ratio to KD's; TAKD needs a teacher with an
    assistant, so res20 teaches here (its assistant is res14)."""
    argv = ["--gpu_id", "cpu", "--stages", "dih", "--teacher", "res20", "--num_classes", str(NUM_CLASSES),
            "--batch_size", str(BATCH), "--steps", "1", "--warmup", "0", "--repeats", "1", "--methods"]
    assert bench_cli.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    costs = {row["method"]: row for row in record["methods"]}
    assert list(costs) == [name for name, method in METHODS.items() if method.teacher != "none"]
    assert costs["kd"]["vs_kd"] == 1.0 and all(row["ms_per_step"] > 0 for row in costs.values())


def test_bench_times_a_group_against_its_students_alone_and_projects_the_preset(capsys, monkeypatch):
    """`--group`: the students of one teacher as a group and each alone, their losses equal bit for bit on the CPU;
    `--project`: the preset's cost with and without groups, here for one teacher and four of its methods."""
    from sweep.cost import PROJECTED
    from sweep.grid import PRESETS

    monkeypatch.setitem(PRESETS[PROJECTED], "methods", ["ce", "kd", "tofd", "dih"])
    argv = ["--gpu_id", "cpu", "--stages", "none", "--teacher", "res8", "--num_classes", str(NUM_CLASSES),
            "--batch_size", str(BATCH), "--steps", "1", "--warmup", "0", "--repeats", "1", "--group", "kd", "crd",
            "dih", "--project", "res14"]
    monkeypatch.setattr(TeacherPass, "__call__", slowed(TeacherPass.__call__))  # a teacher far dearer than a step
    assert bench_cli.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (group,) = record["groups"]
    assert [s["method"] for s in group["students"]] == ["kd", "crd", "dih"]
    assert all(s["losses_equal"] and len(s["losses"]) == 2 for s in group["students"])
    # Alone, each of the three students pays the teacher's DELAY; as a group they pay it once a step.
    alone, together = group["one_after_another_ms_per_step"], group["group_ms_per_step"]
    assert alone >= 3 * DELAY * 1000 and together >= DELAY * 1000
    assert alone - together >= 1.5 * DELAY * 1000 and group["speedup"] > 1.0  # two passes saved, up to noise
    (row,) = record["projection"]["teachers"]
    assert row["teacher"] == "res14" and [group["methods"] for group in row["groups"]] == [["kd", "dih"]]
    assert set(row["steps_ms"]) == {"teacher", "TOFD teacher", "heads", "tofd"} and record["projection"]["ce_hours"] > 0
    assert row["hours_with_grouping"] > 0 and row["hours_without_grouping"] > 0  # (one step each: too noisy to order)


def test_bench_fails_when_the_paths_disagree(monkeypatch, capsys):
    real = measures.conventional_step

    def off_by_one(*args):
        step = real(*args)
        return lambda x, y: step(x, y) + 1.0

    monkeypatch.setattr(measures, "conventional_step", off_by_one)
    argv = ["--gpu_id", "cpu", "--stages", "heads", "--teacher", "res8", "--num_classes", str(NUM_CLASSES),
            "--batch_size", str(BATCH), "--steps", "1", "--warmup", "0", "--repeats", "1"]
    assert bench_cli.main(argv) == 1
    assert "losses differ for heads" in capsys.readouterr().err
