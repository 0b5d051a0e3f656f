"""Training-step throughput of the three DIH stages: the project's fast path against a conventional one.

    python3 bench.py --gpu_id 0                # teacher, heads and DIH stages: res110 -> res8, 100 classes, batch 64
    python3 bench.py --gpu_id cpu --quick      # the same with few steps: under 3 minutes on a 2-core CPU
    python3 bench.py --growth                  # + epoch time for teachers res20/56/110 at batch 64/128/256
    python3 bench.py --ablation                # + the fast path with one optimisation flipped at a time
    python3 bench.py --ablation fold channels_last   # + only those two flipped
    python3 bench.py --stages none --group kd at crd dih  # students of one teacher as a group, against each alone
    python3 bench.py --stages none --project   # reproduce.py --preset paper-cifar100's cost with and without groups

Both paths train copies of the same randomly initialised models on the same random CIFAR-shaped uint8 images;
the arithmetic of a step does not depend on the weights, so random teacher and heads are enough for timing.
The fast path is the project's own code: a `DeviceDataset` with `data.train_batches`, the stages of
`stages.py`, and the engine's step (`engine.GroupStep` on a `Run`: the teacher's shared pass, then the train step)
with the `TrainConfig` the stage scripts would build for these flags (`--amp` and `--channels_last` force the
settings, e.g. to measure another CPU's defaults), the frozen teacher with its batch norms folded as the stage
scripts fold it.
The conventional path, written below as the foil, is how most KD code trains: a torchvision DataLoader with
per-image PIL transforms, fp32, eager, NCHW, the frozen teacher and each head called as separate modules
under no_grad, the loss summed over the cohort in a Python loop, `loss.item()` every step.

Before timing, the two paths of each stage compute the loss of one un-augmented batch; they must agree
(fp32: to rounding, bf16: within its precision) or the script exits 1. Times are the median over repeats of
`--steps` steps each, after `--warmup` steps, with the device synchronised before the clock is read; the paths
compared (fast and conventional, or an ablation's two variants) take turns, repeat by repeat, so that a change
of load on a shared machine hits both alike.
A group's students must have the same losses as each alone (bit for bit on the CPU) or the script exits 1.
The last line printed is one JSON object for the DIH stage (or the last stage measured).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

import cli
from cuda_graphs import WARMUP_STEPS
from data import CIFAR_SOURCES, Batch, DeviceDataset, from_arrays, test_batches, train_batches
from engine import GroupStep, Run, Stage, TrainConfig, make_shared_step
from execution import COMPILE_MODES
from heads import IntermediateHeads, heads_for, tofd_aux_for
from methods import METHODS, Setup, TeacherOutputs, TeacherPass
from methods.dih import CohortDistillation
from methods.takd import default_assistant
from methods.tofd import TOFDTeacher
from models import MODEL_NAMES, TapModel, build_model, fold_batchnorm
from stages import HeadsTraining, TeacherTraining

STAGES = ("teacher", "heads", "dih")
ALPHA, TEMPERATURE = 0.1, 5.0  # the paper's defaults
MEAN, STD = CIFAR_SOURCES["cifar100"].mean, CIFAR_SOURCES["cifar100"].std
EPOCH_IMAGES = 50_000  # one CIFAR training set, for the growth table's extrapolated epoch time
GROWTH_TEACHERS, GROWTH_BATCHES = ("res20", "res56", "res110"), (64, 128, 256)
RTOL = {False: 1e-4, True: 2e-2}  # loss agreement between the paths: fp32, bf16 (8-bit mantissa)
JSON_KEYS = ("stage", "device", "batch_size", "fast_img_s", "conventional_img_s", "ratio")

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


def fast_step(stage: Stage, cfg: TrainConfig, sync_each_step: bool = False) -> Step:
    """What `engine.fit_group` does per batch for a run alone: its shared pass (a student's teacher) and its own
    train step, metrics accumulated on the device."""
    if cfg.compile:  # every measurement compiles afresh: dynamo's per-function cache would otherwise fill up
        torch._dynamo.reset()  # after 8 models and silently fall back to eager
    device = next(stage.trainable.parameters()).device
    run, group_step = Run(stage, cfg, device), GroupStep(cfg)
    run.start_epoch(1)
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)

    def step(x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        nonlocal loss_sum, correct
        ((loss, batch_correct),) = group_step([run], Batch(x, y, index))
        loss_sum += loss * y.numel()
        correct += batch_correct
        if sync_each_step:  # ablation: what a per-step loss.item() costs
            loss.item()
        return loss

    return step


# ----------------------------------------------------------------------------- the conventional path


class PilImages(Dataset):
    """The conventional input pipeline: each item becomes a PIL image and goes through torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool):
        self.images, self.labels = images, labels
        crop_flip = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]  # zeros, as ours
        self.transform = transforms.Compose(
            [*(crop_flip if augment else []), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def conventional_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device) -> DataLoader:
    """A DataLoader as KD code usually builds one: one worker per core, pinned memory on CUDA, shuffled."""
    return DataLoader(
        PilImages(images, labels, augment=True),
        batch_size=batch_size,
        shuffle=True,
        num_workers=os.cpu_count() or 1,
        pin_memory=device.type == "cuda",
        drop_last=False,  # as data.train_batches
    )


def conventional_step(kind: str, models: Models, cfg: TrainConfig, device: torch.device) -> Step:
    """One conventional training step of stage `kind` on a CPU batch; returns the loss as a Python float.

    Only the optimiser's settings are taken from `cfg`: this path is always fp32, NCHW and eager.
    """
    teacher = place(models.teacher, device, channels_last=False)
    heads = list(place(models.heads, device, channels_last=False).heads)
    if kind == "teacher":
        trainable: list[nn.Module] = [teacher.train()]
    else:
        teacher.eval().requires_grad_(False)
        trainable = heads if kind == "heads" else [place(models.student, device, channels_last=False).train()]
        if kind == "dih":
            for head in heads:
                head.eval().requires_grad_(False)
    optimizer = torch.optim.SGD(
        [p for module in trainable for p in module.parameters()],
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd, nesterov=cfg.nesterov,
    )

    def losses(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if kind == "teacher":
            logits = teacher(x)
            return F.cross_entropy(logits, y), logits
        if kind == "heads":
            with torch.no_grad():
                features = teacher.forward_features(x).taps
            outputs = [head(f.flatten(1)) for head, f in zip(heads, features, strict=True)]
            return sum(F.cross_entropy(out, y) for out in outputs), outputs[-1]
        with torch.no_grad():
            final, features, _ = teacher.forward_features(x)
            for _ in range(2):  # the original computed every head's logits twice per step (SPEC section 2)
                head_logits = [head(f.flatten(1)) for head, f in zip(heads, features, strict=True)]
            cohort = [final, *head_logits]
        logits = trainable[0](x)
        loss = torch.zeros((), device=device)
        for member in cohort:
            log_q, p = F.log_softmax(logits / TEMPERATURE, 1), F.softmax(member / TEMPERATURE, 1)
            kl = F.kl_div(log_q, p, reduction="batchmean")
            loss = loss + (1 - ALPHA) * F.cross_entropy(logits, y) + ALPHA * TEMPERATURE**2 * kl
        return loss, logits

    def step(x: Tensor, y: Tensor) -> float:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, logits = losses(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        (logits.argmax(1) == y).sum().item()  # the running accuracy such loops print
        return loss.item()

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


@dataclass(frozen=True)
class Workload:
    """One setting to measure: the models, the images (host and device copies) and the engine's config."""

    models: Models
    images: np.ndarray
    labels: np.ndarray
    data: DeviceDataset
    cfg: TrainConfig
    device: torch.device
    plan: Plan

    @classmethod
    def build(
        cls, teacher: str, student: str, num_classes: int, cfg: TrainConfig, device: torch.device, plan: Plan
    ) -> Workload:
        """Random images enough for the plan, on the host and on the device, and fresh models."""
        if device.type == "cuda":  # cuDNN autotunes, and a CUDA graph is captured, within the warm-up
            plan = dataclasses.replace(plan, warmup=max(plan.warmup, WARMUP_STEPS + 1))
        images, labels = random_images(plan.batches * cfg.batch_size, num_classes)
        data = device_dataset(images, labels, num_classes, device)
        return cls(make_models(teacher, student, num_classes), images, labels, data, cfg, device, plan)

    def fast_step(self, kind: str, cfg: TrainConfig | None = None, cohort_twice: bool = False,
                  sync_each_step: bool = False, fold: bool = True) -> Step:
        return fast_step(fast_stage(kind, self.models, cfg or self.cfg, self.device, cohort_twice, fold),
                         cfg or self.cfg, sync_each_step)

    def conventional_step(self, kind: str) -> Step:
        return conventional_step(kind, self.models, self.cfg, self.device)

    def fast_batches(self, cfg: TrainConfig | None = None, loader: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """Batches from `data.train_batches` or (ablation) from the conventional DataLoader."""
        cfg = cfg or self.cfg
        if loader:
            memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
            batches: Iterator[tuple[Tensor, ...]] = (
                (x.to(self.device, non_blocking=True).contiguous(memory_format=memory_format), y.to(self.device))
                for x, y in conventional_loader(self.images, self.labels, cfg.batch_size, self.device)
            )
        else:
            generator = torch.Generator(device=self.device).manual_seed(0)
            batches = train_batches(self.data, cfg.batch_size, generator, channels_last=cfg.channels_last)
        return batches

    def fast(self, kind: str, cfg: TrainConfig | None = None, *, cohort_twice: bool = False,
             loader: bool = False, sync_each_step: bool = False, fold: bool = True) -> Timed:
        """A fresh fast path and its batches, optionally with one optimisation undone (the ablation)."""
        return self.fast_step(kind, cfg, cohort_twice, sync_each_step, fold), self.fast_batches(cfg, loader)

    def conventional(self, kind: str) -> Timed:
        loader = conventional_loader(self.images, self.labels, self.cfg.batch_size, self.device)
        return self.conventional_step(kind), iter(loader)

    def check(self, fast: Step, conventional: Step) -> tuple[float, float, bool]:
        """Both steps' loss on the same un-augmented first batch: (fast, conventional, agree).

        Run on fresh steps, so that both start from the same weights; with torch.compile this first call
        also compiles, and the timing that follows reuses it.
        """
        batch = self.cfg.batch_size
        x, y = next(test_batches(self.data, batch, channels_last=self.cfg.channels_last))
        unaugmented = PilImages(self.images, self.labels, augment=False)
        xc, yc = default_collate([unaugmented[i] for i in range(batch)])
        fast_loss, conventional_loss = float(fast(x, y)), conventional(xc, yc)
        agree = math.isclose(fast_loss, conventional_loss, rel_tol=RTOL[self.cfg.amp], abs_tol=1e-6)
        return fast_loss, conventional_loss, agree

    def gflop(self, kind: str) -> float:
        """Arithmetic of one training step (forward and backward, fp32 NCHW), counted on the meta device."""
        meta = torch.device("meta")
        cfg = dataclasses.replace(self.cfg, amp=False, compile=False, channels_last=False)
        stage = fast_stage(kind, self.models, cfg, meta)
        x = torch.empty(cfg.batch_size, 3, 32, 32, device=meta)
        y = torch.zeros(cfg.batch_size, dtype=torch.int64, device=meta)
        with FlopCounterMode(display=False) as counter:
            stage.training_loss(Batch(x, y, None))[0].backward()
        return counter.get_total_flops() / 1e9


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


def compare(work: Workload, kinds: list[str]) -> list[dict[str, Any]]:
    """Each stage through both paths: the loss check, then the timings (interleaved)."""
    results = []
    for kind in kinds:
        (fast, fast_batches), (conventional, conventional_batches) = work.fast(kind), work.conventional(kind)
        fast_loss, conventional_loss, ok = work.check(fast, conventional)
        conventional_s, fast_s = seconds_per_step([(conventional, conventional_batches), (fast, fast_batches)],
                                                  work.plan, work.device)
        gflop = work.gflop(kind)
        batch = work.cfg.batch_size
        results.append({
            "stage": kind,
            "fast_img_s": round(batch / fast_s, 1),
            "conventional_img_s": round(batch / conventional_s, 1),
            "ratio": round(conventional_s / fast_s, 3),
            "fast_ms_per_step": round(1e3 * fast_s, 2),
            "conventional_ms_per_step": round(1e3 * conventional_s, 2),
            "gflop_per_step": round(gflop, 2),
            "fast_tflop_s": round(gflop / fast_s / 1e3, 3),
            "loss_check": {"fast": fast_loss, "conventional": conventional_loss, "rtol": RTOL[work.cfg.amp], "ok": ok},
        })
    rows = []
    for r in results:
        check = r["loss_check"]
        verdict = f"{check['fast']:.5f} vs {check['conventional']:.5f} {'ok' if check['ok'] else 'FAIL'}"
        rows.append([r["stage"], r["conventional_img_s"], r["fast_img_s"], f"{r['ratio']:.2f}x",
                     r["conventional_ms_per_step"], r["fast_ms_per_step"], r["gflop_per_step"], r["fast_tflop_s"],
                     verdict])
    print_table(
        f"fast path ({describe(work.cfg)}) vs conventional (DataLoader + PIL, fp32, NCHW, eager), images/s",
        ["stage", "conventional", "fast", "ratio", "conv ms/step", "fast ms/step", "GFLOP/step", "fast TFLOP/s",
         f"loss check, same batch (rtol {RTOL[work.cfg.amp]:g})"],
        rows,
    )
    return results


def method_stage(method: str, work: Workload, data: DeviceDataset, cfg: TrainConfig,
                 shared: TeacherPass | None = None) -> Stage:
    """A student stage of `method` on copies of the workload's models, each method with its defaults, its extras
    drawn from seed 0 (so that two builds are the same numbers).

    TAKD's step is KD from its assistant (res20, BASELINES.md); TOFD's teacher gets random auxiliary
    classifiers (what it trains in its own run). `data` is shaped like CIFAR's training set, since CRD's
    memory banks and negatives scale with it. With `shared`, the stage reads that teacher pass (a group's)
    instead of its own.
    """
    spec = METHODS[method]
    device, channels_last = work.device, cfg.channels_last
    if shared is not None:
        teacher, heads = shared.teacher, shared.heads if spec.heads else None
    else:
        teacher_name = default_assistant(work.models.teacher_name) if spec.assistant else work.models.teacher_name
        teacher = work.models.teacher if teacher_name == work.models.teacher_name else make_models(
            teacher_name, "res8", data.num_classes).teacher
        teacher = fold_batchnorm(place(teacher, device, channels_last))  # as assembly.build_teacher gives it
        heads = place(work.models.heads, device, channels_last).eval().requires_grad_(False) if spec.heads else None
    teacher_ckpt = None
    if spec.teacher == "tofd":
        aux = tofd_aux_for(teacher, data.num_classes, data.image_size)
        teacher_ckpt = {"extras": {"state_dict": nn.ModuleDict({"aux": aux}).state_dict()}}
    torch.manual_seed(0)
    setup = Setup(place(work.models.student, device, channels_last), teacher, dict(spec.defaults), data, meta={},
                  heads=heads, teacher_ckpt=teacher_ckpt, teacher_pass=shared)
    stage = spec.build(setup)
    stage.extras.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    return stage


def cifar_sized(work: Workload) -> DeviceDataset:
    """The workload's data as methods see it, with the length of CIFAR's training set (CRD's memory banks)."""
    n = EPOCH_IMAGES
    return dataclasses.replace(work.data, y_train=torch.arange(n, device=work.device) % work.data.num_classes,
                               x_train=torch.empty((n, *work.data.x_train.shape[1:]), dtype=torch.uint8,
                                                   device=work.device))


def in_last_phase(stage: Stage, cfg: TrainConfig, device: torch.device) -> Run:
    """A run of `stage` at the first epoch of its last phase (FitNets: KD; its hint phase trains a fraction of the
    student), as the engine trains it."""
    run = Run(stage, cfg, device)
    run.start_epoch(run.total - run.phases[-1].epochs + 1)
    return run


def runs_step(runs: list[Run], work: Workload) -> Timed:
    """One engine step of `runs` together per batch (`engine.GroupStep`), and their batches."""
    group_step = GroupStep(work.cfg)

    def step(x: Tensor, y: Tensor, index: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        return group_step(runs, Batch(x, y, index))

    return step, endless_batches(work)


def endless_batches(work: Workload) -> Iterator[Batch]:
    """The engine's augmented batches, epoch after epoch (a group's loss check takes more than the plan's)."""
    generator = torch.Generator(device=work.device).manual_seed(0)
    while True:
        yield from train_batches(work.data, work.cfg.batch_size, generator, work.cfg.channels_last)


def method_costs(work: Workload, names: list[str]) -> list[dict[str, Any]]:
    """Each student method's training step (the engine's step on its stage), interleaved, against KD's."""
    data = cifar_sized(work)
    no_assistant = METHODS["takd"].assistant and default_assistant(work.models.teacher_name) is None
    names = ["kd", *(m for m in names if m != "kd" and not (m == "takd" and no_assistant))]
    variants = [runs_step([in_last_phase(method_stage(name, work, data, work.cfg), work.cfg, work.device)], work)
                for name in names]
    seconds = seconds_per_step(variants, work.plan, work.device)
    results = [{"method": name, "ms_per_step": round(1e3 * t, 1), "vs_kd": round(t / seconds[0], 2)}
               for name, t in zip(names, seconds, strict=True)]
    print_table(f"student methods, {work.models.teacher_name} -> res8 ({describe(work.cfg)}), per training step "
                f"(each method's defaults; CRD's banks sized for {len(data.y_train)} images; TAKD: KD from its "
                "assistant)",
                ["method", "ms/step", "vs KD"],
                [[r["method"], r["ms_per_step"], f"{r['vs_kd']:.2f}x"] for r in results])
    return results


CHECK_STEPS = 2  # steps on which a grouped student's loss must equal its solo run's, before the timing


def group_costs(work: Workload, names: list[str]) -> dict[str, Any]:
    """Students of one teacher trained as a group (each batch drawn once, one teacher pass, then every student's
    own step) against the same students each alone, one after another (each with its own teacher pass).

    All start from the same weights and see the same batches: their losses over the first `CHECK_STEPS` steps
    must be equal (on the CPU bit for bit: the group computes what each run alone computes), then the group's
    step and each student's step alone are timed, taking turns.
    """
    data = cifar_sized(work)
    teacher = fold_batchnorm(place(work.models.teacher, work.device, work.cfg.channels_last))  # as the scripts do
    heads = place(work.models.heads, work.device, work.cfg.channels_last).eval().requires_grad_(False)
    shared = TeacherPass(teacher, heads)
    group = [in_last_phase(method_stage(name, work, data, work.cfg, shared), work.cfg, work.device) for name in names]
    alone = [[in_last_phase(method_stage(name, work, data, work.cfg), work.cfg, work.device)] for name in names]
    variants = [runs_step(group, work), *(runs_step(runs, work) for runs in alone)]
    losses = [[[float(loss) for loss, _ in step(*next(batches))] for step, batches in variants]
              for _ in range(CHECK_STEPS)]  # per check step: the group's losses, then each student's alone
    equal = [all(step[0][i] == step[1 + i][0] for step in losses) for i in range(len(names))]
    close = [all(math.isclose(step[0][i], step[1 + i][0], rel_tol=1e-5) for step in losses) for i in range(len(names))]
    teacher_pass = make_shared_step(shared, frozenset().union(*(run.phase.needs for run in group)), work.cfg)
    variants.append((lambda x, y, index: teacher_pass(Batch(x, y, index)), endless_batches(work)))
    seconds = seconds_per_step(variants, dataclasses.replace(work.plan, warmup=max(0, work.plan.warmup - CHECK_STEPS)),
                               work.device)
    group_s, alone_s, pass_s = seconds[0], seconds[1:-1], seconds[-1]
    batch = work.cfg.batch_size
    exact = work.device.type == "cpu"  # a GPU's kernels may round differently from call to call
    students = [{"method": name, "alone_ms_per_step": round(1e3 * t, 1), "alone_img_s": round(batch / t, 1),
                 "group_img_s": round(batch / group_s, 1), "losses": [step[0][i] for step in losses],
                 "losses_equal": equal[i], "ok": equal[i] if exact else close[i]}
                for i, (name, t) in enumerate(zip(names, alone_s, strict=True))]
    result = {"methods": names, "group_ms_per_step": round(1e3 * group_s, 1),
              "teacher_pass_ms": round(1e3 * pass_s, 1),
              "one_after_another_ms_per_step": round(1e3 * sum(alone_s), 1),
              "speedup": round(sum(alone_s) / group_s, 3), "students": students}
    rows = [[r["method"], r["alone_ms_per_step"], r["alone_img_s"], r["group_img_s"],
             ("equal" if r["losses_equal"] else "close" if r["ok"] else "DIFFER")] for r in students]
    rows.append(["all, one after another", result["one_after_another_ms_per_step"], round(batch / sum(alone_s), 1),
                 "", ""])
    rows.append(["the group", result["group_ms_per_step"], "", round(batch / group_s, 1),
                 f"{result['speedup']:.2f}x faster"])
    rows.append(["(its teacher pass)", result["teacher_pass_ms"], "", "", ""])
    print_table(f"group {' '.join(names)}: {work.models.teacher_name} -> res8 ({describe(work.cfg)}), images/s per "
                f"student alone and in the group (CRD's banks sized for {len(data.y_train)} images)",
                ["student", "ms/step", "alone img/s", "in group img/s", f"losses, {CHECK_STEPS} steps vs alone"], rows)
    return result


PROJECTED = "paper-cifar100"  # the preset whose cost --project prices


def projection(args: argparse.Namespace, cfg: TrainConfig, device: torch.device, plan: Plan) -> dict[str, Any]:
    """What `reproduce.py --preset paper-cifar100` costs with and without grouping, priced from steps measured here.

    For each teacher (of the preset, or those named): the step of every stage run the preset's graph runs for it
    (its training, plain and TOFD's; its heads; TAKD's assistant, KD into res20; each student alone; the group of
    the students the teacher run teaches) is timed on this device; a run costs its epochs x ceil(50000 / batch)
    steps x its step. Projected, not measured: epochs' evaluation is left out, FitNets' 40 hint epochs are priced
    at its KD step (they cost less), and in the group FitNets' last 40 epochs run alone.
    """
    from sweep.grid import PRESETS

    preset = PRESETS[PROJECTED]
    seeds, epochs, teachers = len(preset["seeds"]), preset["epochs"], args.project or preset["teachers"]
    hint = METHODS["fitnets"].defaults["hint_epochs"] if "fitnets" in preset["methods"] else 0
    steps = math.ceil(EPOCH_IMAGES / cfg.batch_size)
    specs = [METHODS[m] for m in preset["methods"]]
    grouped = [m.name for m in specs if m.teacher == "plain" and not m.assistant]
    rows: list[dict[str, Any]] = []
    ce_s = 0.0
    for teacher in teachers:
        work = Workload.build(teacher, args.student, args.num_classes, cfg, device, plan)
        group = group_costs(work, grouped)
        alone = {s["method"]: s["alone_ms_per_step"] / 1e3 for s in group["students"]}
        data = cifar_sized(work)
        kinds: dict[str, Timed] = {"teacher": work.fast("teacher")}
        if any(m.teacher == "tofd" for m in specs):
            kinds["TOFD teacher"] = tofd_teacher(work)
        if any(m.heads for m in specs):
            kinds["heads"] = work.fast("heads")
        assistant = default_assistant(teacher) if any(m.assistant for m in specs) else None
        if assistant is not None:
            taught = dataclasses.replace(work, models=dataclasses.replace(
                work.models, student=build_model(assistant, args.num_classes)))
            kinds["assistant"] = runs_step([in_last_phase(method_stage("kd", taught, data, cfg), cfg, device)], work)
        names = [m.name for m in specs if m.name not in grouped and (m.teacher != "none" or not rows)
                 and (not m.assistant or assistant is not None)]  # CE's runs serve every teacher: priced once
        kinds |= {name: runs_step([in_last_phase(method_stage(name, work, data, cfg), cfg, device)], work)
                  for name in names}
        seconds = dict(zip(kinds, seconds_per_step(list(kinds.values()), plan, device), strict=True))
        ce_s = seconds.pop("ce", ce_s)
        others = sum(seconds.values()) * epochs  # teachers, heads, assistant, TAKD, TOFD: the same either way
        hinting = alone.get("fitnets", 0.0) * hint
        separate = sum(alone.values()) * epochs + hinting
        together = group["group_ms_per_step"] / 1e3 * epochs + hinting
        rows.append({"teacher": teacher, "steps_ms": {k: round(1e3 * v, 1) for k, v in seconds.items()},
                     "group": group, "group_speedup": group["speedup"],
                     "hours_without_grouping": round((others + separate) * steps * seeds / 3600, 2),
                     "hours_with_grouping": round((others + together) * steps * seeds / 3600, 2)})
    ce_hours = ce_s * epochs * steps * seeds / 3600
    without = sum(r["hours_without_grouping"] for r in rows) + ce_hours
    with_groups = sum(r["hours_with_grouping"] for r in rows) + ce_hours
    print_table(f"projection: reproduce.py --preset {PROJECTED} ({len(teachers)} of its {len(preset['teachers'])} "
                f"teachers, {seeds} seeds, {epochs} epochs) on this device, {describe(cfg)}; hours projected from "
                "the steps measured here (evaluation left out)",
                ["teacher", "group speed-up", "hours without grouping", "hours with grouping"],
                [*([r["teacher"], f"{r['group_speedup']:.2f}x", r["hours_without_grouping"],
                    r["hours_with_grouping"]] for r in rows),
                 ["CE (one per seed)", "", round(ce_hours, 2), round(ce_hours, 2)],
                 ["all", "", round(without, 1), f"{with_groups:.1f} ({without / with_groups:.2f}x less time)"]])
    return {"preset": PROJECTED, "teachers": rows, "ce_hours": round(ce_hours, 2), "hours_without_grouping":
            round(without, 2), "hours_with_grouping": round(with_groups, 2), "ratio": round(without / with_groups, 3)}


def tofd_teacher(work: Workload) -> Timed:
    """The step of TOFD's teacher training (the backbone with its auxiliary classifiers, from scratch)."""
    model = place(work.models.teacher, work.device, work.cfg.channels_last).train()
    aux = tofd_aux_for(model, work.data.num_classes, work.data.image_size)
    memory_format = torch.channels_last if work.cfg.channels_last else torch.preserve_format
    stage = TOFDTeacher(model, work.models.teacher_name, aux.to(work.device, memory_format=memory_format))
    return fast_step(stage, work.cfg), work.fast_batches()


def growth(args: argparse.Namespace, cfg: TrainConfig, device: torch.device, plan: Plan) -> list[dict[str, Any]]:
    """DIH-stage epoch time against teacher depth and batch size, both paths."""
    rows = []
    for teacher in GROWTH_TEACHERS:
        for batch in GROWTH_BATCHES:
            bcfg = dataclasses.replace(cfg, batch_size=batch)
            work = Workload.build(teacher, args.student, args.num_classes, bcfg, device, plan)
            fast_s, conventional_s = seconds_per_step([work.fast("dih"), work.conventional("dih")], work.plan,
                                                      device)
            steps = math.ceil(EPOCH_IMAGES / batch)
            rows.append({"teacher": teacher, "batch_size": batch, "fast_epoch_s": round(fast_s * steps, 1),
                         "conventional_epoch_s": round(conventional_s * steps, 1),
                         "ratio": round(conventional_s / fast_s, 3)})
    print_table(
        f"growth: DIH stage ({args.student} student) epoch time, extrapolated = measured step time x "
        f"ceil({EPOCH_IMAGES} / batch) steps",
        ["teacher", "batch", "conventional s/epoch", "fast s/epoch", "ratio"],
        [[r["teacher"], r["batch_size"], r["conventional_epoch_s"], r["fast_epoch_s"], f"{r['ratio']:.2f}x"]
         for r in rows],
    )
    return rows


ABLATIONS = ("channels_last", "amp", "compile", "loader", "sync", "fold", "cohort", "graphs", "cudnn")


def ablation(work: Workload, kinds: list[str], only: list[str] | None = None) -> list[dict[str, Any]]:
    """The fast path with one optimisation flipped at a time, timed in turns with an unflipped one: images/s
    with the optimisation and without it. `only`: these of `ABLATIONS` (default: every one that applies)."""
    cfg, rows = work.cfg, []

    def flip(field: str) -> TrainConfig:
        return dataclasses.replace(cfg, **{field: not getattr(cfg, field)})

    for kind in kinds:
        variants: list[tuple[str, str, bool, Callable[[], Timed]]] = [
            ("channels_last", "channels_last", cfg.channels_last, partial(work.fast, kind, flip("channels_last"))),
            ("amp", "bf16 autocast", cfg.amp, partial(work.fast, kind, flip("amp"))),
            ("compile", "torch.compile", cfg.compile, partial(work.fast, kind, flip("compile"))),
            ("loader", "data on the device (vs DataLoader)", True, partial(work.fast, kind, loader=True)),
            ("sync", "no host sync per step (vs loss.item())", True, partial(work.fast, kind, sync_each_step=True)),
        ]
        if kind != "teacher":
            variants.append(("fold", "frozen teacher's BNs folded", True, partial(work.fast, kind, fold=False)))
        if kind == "dih":
            variants.append(("cohort", "cohort once (vs heads twice)", True,
                             partial(work.fast, kind, cohort_twice=True)))
        if work.device.type == "cuda":
            variants += [("graphs", "CUDA graphs", cfg.cuda_graphs, partial(work.fast, kind, flip("cuda_graphs"))),
                         ("cudnn", "cudnn.benchmark", torch.backends.cudnn.benchmark,
                          partial(_flipped_cudnn_benchmark, work, kind))]
        for key, name, in_fast_path, flipped in variants:
            if only and key not in only:
                continue
            base_s, flipped_s = seconds_per_step([work.fast(kind), flipped()], work.plan, work.device)
            base, flipped_img_s = work.cfg.batch_size / base_s, work.cfg.batch_size / flipped_s
            on, off = (base, flipped_img_s) if in_fast_path else (flipped_img_s, base)
            rows.append({"stage": kind, "optimisation": name, "in_fast_path": in_fast_path,
                         "img_s_on": round(on, 1), "img_s_off": round(off, 1), "gain": round(on / off, 3)})
    print_table(
        f"ablation: the fast path ({describe(cfg)}) with one optimisation flipped, images/s",
        ["stage", "optimisation", "in fast path", "on", "off", "gain on/off"],
        [[r["stage"], r["optimisation"], "yes" if r["in_fast_path"] else "no", r["img_s_on"], r["img_s_off"],
          f"{r['gain']:.2f}x"] for r in rows],
    )
    return rows


def _flipped_cudnn_benchmark(work: Workload, kind: str) -> Timed:
    """The fast path with cuDNN's autotuning flipped during its own steps only (the variants take turns)."""
    step, batches = work.fast(kind)

    def flipped(*batch: Tensor) -> Any:
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = not previous
        try:
            return step(*batch)
        finally:
            torch.backends.cudnn.benchmark = previous

    return flipped, batches


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu_id", default=None, help="0, cuda:1 or cpu (default: the first GPU if any, else the CPU)")
    p.add_argument("--stages", default=",".join(STAGES), help="some of teacher,heads,dih; or none")
    p.add_argument("--teacher", default="res110", choices=MODEL_NAMES, metavar="MODEL", help="a model of the zoo")
    p.add_argument("--student", default="res8", choices=MODEL_NAMES, metavar="MODEL", help="a model of the zoo")
    p.add_argument("--num_classes", type=int, default=100, help="as CIFAR-100")
    p.add_argument("--batch_size", type=int, default=64, help="the paper's")
    p.add_argument("--steps", type=int, default=None, help="steps per timed repeat (default: 20; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5, at least 3 on CUDA; "
                                                             "--quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, the paths taking turns; the median "
                                                              "counts (default: 5; --quick: 3)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast (auto: what the stage scripts choose for the device)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                   help="torch.compile and/or CUDA graphs, as the stage scripts' flag (auto: what they choose)")
    p.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                   help="the fast path's memory format (auto: what the stage scripts choose for the device); "
                        "with --amp, how another CPU's defaults are measured here (docs/BENCHMARKS.md, AVX2)")
    p.add_argument("--quick", action="store_true", help="few steps: about 30 s on 2 quiet CPU cores")
    p.add_argument("--growth", action="store_true", help="also epoch times for res20/56/110 x batch 64/128/256")
    p.add_argument("--ablation", nargs="*", choices=ABLATIONS, default=None, metavar="NAME",
                   help="also the fast path with each optimisation flipped (names: only those, of "
                        f"{', '.join(ABLATIONS)})")
    p.add_argument("--methods", nargs="*", choices=tuple(METHODS), default=None, metavar="METHOD",
                   help="also the student step of these methods against KD's (no names: every method but CE)")
    p.add_argument("--project", nargs="*", choices=MODEL_NAMES, default=None, metavar="TEACHER",
                   help=f"also the cost of reproduce.py --preset {PROJECTED} with and without grouping, from steps "
                        "measured here (no names: all its teachers; names: only theirs)")
    p.add_argument("--group", nargs="+", action="append", choices=tuple(METHODS), metavar="METHOD",
                   help="also these students of the teacher as one group against each alone, one after another "
                        "(repeat the flag for several groups), e.g. --group kd at crd dih")
    args = p.parse_args(argv)
    args.stages = [] if args.stages == "none" else [s.strip() for s in args.stages.split(",") if s.strip()]
    if not set(args.stages) <= set(STAGES) or not (args.stages or args.methods is not None or args.group
                                                     or args.project is not None):
        p.error(f"--stages must name some of {', '.join(STAGES)} (or none, with --methods, --group or --project), got "
                f"{','.join(args.stages)!r}")
    for names in args.group or []:
        alone = [name for name in names if METHODS[name].teacher != "plain" or METHODS[name].assistant]
        if alone or len(set(names)) != len(names):
            p.error(f"--group {' '.join(names)}: name distinct methods taught by the teacher itself "
                    f"({alone[0] if alone else 'a repeated one'} is not one)")
    for name, quick, full in (("steps", 2, 20), ("warmup", 1, 5), ("repeats", 3, 5)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.steps, args.repeats, args.num_classes - 1) < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be at least 1, --warmup at least 0, --num_classes at least 2")
    return args


def engine_config(args: argparse.Namespace) -> tuple[torch.device, TrainConfig]:
    """The device and `TrainConfig` that the stage scripts build for these flags (cli.parse decides amp,
    compile, channels_last and cudnn.benchmark per device type); `--channels_last on|off` overrides the layout."""
    argv = ["--batch_size", str(args.batch_size), "--amp", args.amp, "--compile", args.compile]
    _, device, cfg = cli.parse(cli.common_parser(""), argv + (["--gpu_id", args.gpu_id] if args.gpu_id else []))
    if args.channels_last != "auto":
        cfg = dataclasses.replace(cfg, channels_last=args.channels_last == "on")
    return device, cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, cfg = engine_config(args)
    plan = Plan(args.warmup, args.steps, args.repeats)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    print(f"bench: {args.teacher} -> {args.student}, {args.num_classes} classes, batch {cfg.batch_size} on "
          f"{device_name(device)}; torch {torch.__version__}; {plan.repeats} repeats x {plan.steps} steps after "
          f"{plan.warmup} warm-up; random-init teacher and heads (BN-calibrated) on random uint8 images; "
          f"load average {load_before:.2f}", flush=True)
    if load_before > 0.5 * (os.cpu_count() or 1):
        print(f"bench.py: warning: the machine is busy (load average {load_before:.1f} on {os.cpu_count()} cores); "
              f"CPU-side timings will be unreliable", file=sys.stderr)
    work = Workload.build(args.teacher, args.student, args.num_classes, cfg, device, plan)
    results = compare(work, args.stages)
    extra: dict[str, Any] = {}
    if args.ablation is not None:
        extra["ablation"] = ablation(work, args.stages, args.ablation)
    if args.growth:
        extra["growth"] = growth(args, cfg, device, plan)
    if args.methods is not None:
        extra["methods"] = method_costs(work, args.methods or [m for m in METHODS if m != "ce"])
    if args.group:
        extra["groups"] = [group_costs(work, names) for names in args.group]
    if args.project is not None:
        extra["projection"] = projection(args, cfg, device, plan)
    headline = next((r for r in results if r["stage"] == "dih"), results[-1] if results else {})
    failed = [r["stage"] for r in results if not r["loss_check"]["ok"]]
    groups = [*extra.get("groups", []), *(row["group"] for row in extra.get("projection", {}).get("teachers", []))]
    unequal = [s["method"] for group in groups for s in group["students"] if not s["ok"]]
    total_s, load_after = time.perf_counter() - started, os.getloadavg()[0]
    print(f"\ntotal {total_s:.0f}s, load average {load_after:.2f}", flush=True)
    print(json.dumps({
        **({"stage": headline["stage"]} if headline else {}),
        "device": device_name(device),
        "batch_size": cfg.batch_size,
        **{key: value for key, value in headline.items() if key != "stage"},
        "teacher": args.teacher,
        "student": args.student,
        "num_classes": args.num_classes,
        "amp": cfg.amp,
        "compile": cfg.compile,
        "cuda_graphs": cfg.cuda_graphs,
        "channels_last": cfg.channels_last,
        "plan": dataclasses.asdict(plan),
        "torch": torch.__version__,
        "total_s": round(total_s, 1),
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],  # other work on the machine skews timings
        "stages": {r["stage"]: {k: r[k] for k in JSON_KEYS[3:]} for r in results},
        **extra,
    }))
    if failed:
        print(f"bench.py: error: the fast and conventional losses differ for {', '.join(failed)}", file=sys.stderr)
        return 1
    if unequal:
        print(f"bench.py: error: in a group, the losses of {', '.join(unequal)} differ from their runs alone",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.main_guard(lambda argv: sys.exit(main(argv)))
