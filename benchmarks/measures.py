"""What bench.py measures: each stage through both paths (`compare`), the student methods against KD, students as
a group against each alone, epoch time against depth and batch, and the ablation."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

from cuda_graphs import WARMUP_STEPS
from data import Batch, DeviceDataset, test_batches, train_batches
from engine import GroupStep, Run, Stage, TrainConfig, make_shared_step
from heads import tofd_aux_for
from methods import METHODS, Setup, TeacherPass
from methods.takd import default_assistant
from methods.tofd import TOFDTeacher
from models import fold_batchnorm

from .conventional import PilImages, conventional_loader, conventional_step
from .harness import (
    EPOCH_IMAGES,
    Models,
    Plan,
    Step,
    Timed,
    describe,
    device_dataset,
    engine_step,
    fast_stage,
    make_models,
    place,
    print_table,
    random_images,
    seconds_per_step,
)

GROWTH_TEACHERS, GROWTH_BATCHES = ("res20", "res56", "res110"), (64, 128, 256)
RTOL = {False: 1e-4, True: 2e-2}  # loss agreement between the paths: fp32, bf16 (8-bit mantissa)


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
        """The fast path's step of stage `kind` on fresh copies of the models (the flags: the ablation's)."""
        return engine_step(fast_stage(kind, self.models, cfg or self.cfg, self.device, cohort_twice, fold),
                           cfg or self.cfg, sync_each_step)

    def conventional_step(self, kind: str) -> Step:
        """The conventional path's step of stage `kind` on fresh copies of the models."""
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

    def fast_timed(self, kind: str, cfg: TrainConfig | None = None, *, cohort_twice: bool = False,
                   loader: bool = False, sync_each_step: bool = False, fold: bool = True) -> Timed:
        """A fresh fast path and its batches, optionally with one optimisation undone (the ablation)."""
        return self.fast_step(kind, cfg, cohort_twice, sync_each_step, fold), self.fast_batches(cfg, loader)

    def conventional_timed(self, kind: str) -> Timed:
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



def compare(work: Workload, kinds: list[str]) -> list[dict[str, Any]]:
    """Each stage through both paths: the loss check, then the timings (interleaved)."""
    results = []
    for kind in kinds:
        fast, fast_batches = work.fast_timed(kind)
        conventional, conventional_batches = work.conventional_timed(kind)
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


def tofd_teacher(work: Workload) -> Timed:
    """The step of TOFD's teacher training (the backbone with its auxiliary classifiers, from scratch)."""
    model = place(work.models.teacher, work.device, work.cfg.channels_last).train()
    aux = tofd_aux_for(model, work.data.num_classes, work.data.image_size)
    memory_format = torch.channels_last if work.cfg.channels_last else torch.preserve_format
    stage = TOFDTeacher(model, work.models.teacher_name, aux.to(work.device, memory_format=memory_format))
    return engine_step(stage, work.cfg), work.fast_batches()


def growth(args: argparse.Namespace, cfg: TrainConfig, device: torch.device, plan: Plan) -> list[dict[str, Any]]:
    """DIH-stage epoch time against teacher depth and batch size, both paths."""
    rows = []
    for teacher in GROWTH_TEACHERS:
        for batch in GROWTH_BATCHES:
            bcfg = dataclasses.replace(cfg, batch_size=batch)
            work = Workload.build(teacher, args.student, args.num_classes, bcfg, device, plan)
            fast_s, conventional_s = seconds_per_step([work.fast_timed("dih"), work.conventional_timed("dih")],
                                                      work.plan, device)
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
        fast = partial(work.fast_timed, kind)
        variants: list[tuple[str, str, bool, Callable[[], Timed]]] = [
            ("channels_last", "channels_last", cfg.channels_last, partial(fast, flip("channels_last"))),
            ("amp", "bf16 autocast", cfg.amp, partial(fast, flip("amp"))),
            ("compile", "torch.compile", cfg.compile, partial(fast, flip("compile"))),
            ("loader", "data on the device (vs DataLoader)", True, partial(fast, loader=True)),
            ("sync", "no host sync per step (vs loss.item())", True, partial(fast, sync_each_step=True)),
        ]
        if kind != "teacher":
            variants.append(("fold", "frozen teacher's BNs folded", True, partial(fast, fold=False)))
        if kind == "dih":
            variants.append(("cohort", "cohort once (vs heads twice)", True,
                             partial(fast, cohort_twice=True)))
        if work.device.type == "cuda":
            variants += [("graphs", "CUDA graphs", cfg.cuda_graphs, partial(fast, flip("cuda_graphs"))),
                         ("cudnn", "cudnn.benchmark", torch.backends.cudnn.benchmark,
                          partial(_flipped_cudnn_benchmark, work, kind))]
        for key, name, in_fast_path, flipped in variants:
            if only and key not in only:
                continue
            base_s, flipped_s = seconds_per_step([work.fast_timed(kind), flipped()], work.plan, work.device)
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
    step, batches = work.fast_timed(kind)

    def flipped(*batch: Tensor) -> Any:
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = not previous
        try:
            return step(*batch)
        finally:
            torch.backends.cudnn.benchmark = previous

    return flipped, batches

