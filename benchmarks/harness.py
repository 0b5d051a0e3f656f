"""The measuring harness: the random models and images both paths start from, the fast path (the project's own
stage and engine step), timing that takes turns, and plain-text tables."""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from data import CIFAR_SOURCES, Batch, DeviceDataset, from_arrays
from engine import GroupStep, Run, Stage, TrainConfig
from heads import IntermediateHeads, heads_for
from methods import Setup, TeacherOutputs, TeacherPass
from methods.dih import CohortDistillation
from models import TapModel, build_model, fold_batchnorm
from stages import HeadsTraining, TeacherTraining

STAGES = ("teacher", "heads", "dih")
ALPHA, TEMPERATURE = 0.1, 5.0  # the paper's defaults
MEAN, STD = CIFAR_SOURCES["cifar100"].mean, CIFAR_SOURCES["cifar100"].std
EPOCH_IMAGES = 50_000  # one CIFAR training set: extrapolated epoch times, CRD's memory banks

Step = Callable[[Tensor, Tensor], Any]


# ------------------------------------------------------------------------------------------------ setup


@dataclass(frozen=True)
class Models:
    """Initial weights, on the CPU, that every measurement copies: both paths start from the same numbers."""

    teacher_name: str
    teacher: TapModel
    heads: IntermediateHeads
    student: TapModel


def random_images(n: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-shaped data: uint8 (n, 32, 32, 3) images, as a user's npz holds them, and int64 labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, num_classes, n, dtype=np.int64)


def device_dataset(images: np.ndarray, labels: np.ndarray, num_classes: int, device: torch.device) -> DeviceDataset:
    """The images held on `device` the way `data.load_dataset` holds a dataset; the test split is the same set."""
    return from_arrays(images, labels, images, labels, device, name="random", num_classes=num_classes, mean=MEAN,
                       std=STD)


def calibrate_bn(model: nn.Module, x: Tensor) -> None:
    """Give a random-init model the BN statistics of real activations.

    A random ResNet-110 in eval mode with BN's initial statistics (mean 0, variance 1) amplifies its input
    by ~1e8 over its 54 blocks, so a "frozen teacher" straight from init would give meaningless losses.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(x)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum


def make_models(teacher: str, student: str, num_classes: int, seed: int = 0) -> Models:
    """Random-init teacher (BN-calibrated), its heads (Table 1 taps) and student, built once on the CPU."""
    torch.manual_seed(seed)
    t = build_model(teacher, num_classes)
    images, _ = random_images(256, num_classes, seed + 1)
    calibrate_bn(t, normalise(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())))
    return Models(teacher, t, heads_for(t, num_classes), build_model(student, num_classes))


def normalise(x: Tensor) -> Tensor:
    """uint8 NCHW -> the normalised float input both pipelines produce."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def place(module: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """A private copy of `module` on `device`, in the memory format the path uses."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return copy.deepcopy(module).to(device, memory_format=memory_format)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The device in words, as recorded with the numbers."""
    if device.type == "cuda":
        return f"{device}: {torch.cuda.get_device_name(device)}"
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    return f"cpu: {models[0] if models else 'unknown'} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------- the fast path


class HeadsTwice(TeacherPass):
    """Ablation only: the cohort as the original code evaluated it, every head twice.

    (Under torch.compile the unused first evaluation is optimised away.)
    """

    def __call__(self, batch: Batch, needs: frozenset[str]) -> TeacherOutputs:
        with torch.no_grad():
            final, features, _ = self.teacher.forward_features(batch.x)
            for _ in range(2):  # the original computed every head's logits twice per step (SPEC section 2)
                head_logits = self.heads(features)
            return TeacherOutputs(final, None, None, head_logits)


def fast_stage(kind: str, models: Models, cfg: TrainConfig, device: torch.device, cohort_twice: bool = False,
               fold: bool = True) -> Stage:
    """The project's stage object for `kind`, on copies of the initial weights; the frozen teacher's batch norms
    folded as the stage scripts fold them, unless `fold` is off (the ablation)."""
    teacher = place(models.teacher, device, cfg.channels_last)
    if kind == "teacher":
        return TeacherTraining(teacher.train(), models.teacher_name)
    heads = place(models.heads, device, cfg.channels_last)
    if kind == "heads":
        stage = HeadsTraining(teacher, heads, {"model": models.teacher_name})
        if not fold:
            stage.folded_teacher = stage.teacher
        return stage
    student = place(models.student, device, cfg.channels_last)
    teacher.eval().requires_grad_(False)
    hyper = {"alpha": ALPHA, "temperature": TEMPERATURE, "cohort_reduction": "sum"}
    frozen = fold_batchnorm(teacher) if fold else teacher
    twice = HeadsTwice(frozen, heads) if cohort_twice else None
    return CohortDistillation(Setup(student, frozen, hyper, data=None, meta={}, heads=heads, teacher_pass=twice))


def engine_step(stage: Stage, cfg: TrainConfig, sync_each_step: bool = False) -> Step:
    """What `engine.fit` does per batch for a run alone: its shared pass (a student's teacher) and its own train
    step (the epoch's running sums, two additions on the device, left out). Returns the loss."""
    if cfg.compile:  # every measurement compiles afresh: dynamo's per-function cache would otherwise fill up
        torch._dynamo.reset()  # after 8 models and silently fall back to eager
    device = next(stage.trainable.parameters()).device
    run, group_step = Run(stage, cfg, device), GroupStep(cfg)
    run.start_epoch(1)

    def step(x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        ((loss, _),) = group_step([run], Batch(x, y, index))
        if sync_each_step:  # ablation: what a per-step loss.item() costs
            loss.item()
        return loss

    return step



# --------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Plan:
    """How much to run: `warmup` steps, then `repeats` timed runs of `steps` steps each."""

    warmup: int
    steps: int
    repeats: int

    @property
    def batches(self) -> int:
        return self.warmup + self.steps * self.repeats


Timed = tuple[Step, Iterator[tuple[Tensor, ...]]]  # a step and the batches that feed it


def seconds_per_step(variants: list[Timed], plan: Plan, device: torch.device) -> list[float]:
    """Median wall time per step of each variant over its repeats (`repeat_times`)."""
    return [statistics.median(t) for t in repeat_times(variants, plan, device)]


def repeat_times(variants: list[Timed], plan: Plan, device: torch.device) -> list[list[float]]:
    """Wall time per step of each variant in each repeat, warm-up excluded, device synchronised.

    The variants take turns, one repeat of `plan.steps` steps each, in alternating order: a change of load on
    a shared machine then hits them all alike, instead of whichever happened to run at the time.
    """
    for step, batches in variants:
        for _ in range(plan.warmup):
            step(*next(batches))
    synchronize(device)
    times: list[list[float]] = [[] for _ in variants]
    for repeat in range(plan.repeats):
        order = list(range(len(variants)))
        for i in order if repeat % 2 == 0 else order[::-1]:
            step, batches = variants[i]
            start = time.perf_counter()
            for _ in range(plan.steps):
                step(*next(batches))
            synchronize(device)
            times[i].append((time.perf_counter() - start) / plan.steps)
    return times


# ------------------------------------------------------------------------------------------ reports


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """A plain text table, columns as wide as their widest cell."""
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def describe(cfg: TrainConfig) -> str:
    """The fast path's settings in words, for table titles."""
    kernels = {(False, False): "eager", (True, False): "torch.compile", (False, True): "CUDA graphs",
               (True, True): "torch.compile + CUDA graphs"}[cfg.compile, cfg.cuda_graphs]
    return f"{'bf16 autocast' if cfg.amp else 'fp32'}, {'channels_last' if cfg.channels_last else 'NCHW'}, {kernels}"

