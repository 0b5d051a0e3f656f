"""Checkpoints into networks: a stage's frozen inputs (teacher, DIH's heads) found, read and checked before any
data is loaded, then built on the device; the models a run trains; and the memory layout a resumed run keeps."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path
from typing import Any

import torch

from checkpoint import expect_match, identity, load_checkpoint, load_weights, model_fingerprint
from cli import default_dir
from data import Dataset, dataset_tag
from engine import EXTRAS_FILE, RESUME_FILE, TrainConfig
from heads import IntermediateHeads
from models import TapModel, build_model, fold_batchnorm
from utils import UserError


def build(name: str, num_classes: int, device: torch.device, channels_last: bool, image_size: int) -> TapModel:
    """Build a registered model on `device`; an unknown name, or images too small for it, is a user error."""
    try:
        model = build_model(name, num_classes)
    except ValueError as err:
        raise UserError(str(err)) from None
    try:
        model.tap_shapes(image_size)  # one batch-1 pass: VGG-11's five max-pools need 32 pixels or more
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0]
        raise UserError(f"{name} cannot classify {image_size}x{image_size} images ({reason})") from None
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def keep_layout(cfg: TrainConfig, out_dir: Path, resume: bool) -> TrainConfig:
    """`cfg` with the memory layout (channels_last) the run in `out_dir` started with, when it is resumed.

    The layout follows the device (on for CUDA and AVX-512 CPUs), and the two layouts' kernels round differently
    (a CPU epoch ends about 1e-3 apart), so a run resumed on another kind of device keeps its own layout and
    stays bit-identical wherever the kernels are the same. Either layout runs on every device.
    """
    path = out_dir / RESUME_FILE
    if not (resume and path.is_file()):
        return cfg
    recorded = load_checkpoint(path, "resume", "--resume", mmap=True).get("channels_last", cfg.channels_last)
    if recorded != cfg.channels_last:
        print(f"resuming in the memory layout the run started with (channels_last={recorded}), not this device's "
              f"default ({cfg.channels_last})")
    return dataclasses.replace(cfg, channels_last=recorded)


def read_teacher(args: argparse.Namespace, name: str, variant: str | None = None) -> dict[str, Any]:
    """The checkpoint of teacher `name`: --teacher_ckpt, or stage 1's default place. Read before any data is.

    Any trained model serves as a plain teacher: a stage-1 teacher.pt (a variant's too: it holds the plain
    model), or any method's student.pt (TAKD's assistant is one). `variant="tofd"` asks for a TOFD teacher
    (trained with its auxiliary classifiers), refuses any other, and reads the extras.pt beside it into
    `ckpt["extras"]`, checked to belong to these very weights.
    """
    folder = f"teacher-{name}" + (f"-{variant}" if variant else "")
    path = Path(args.teacher_ckpt or default_dir(dataset_tag(args.dataset), folder, args.seed) / "teacher.pt")
    command = shlex.join(["python3", "train_teacher.py", "--model", name, *([f"--{variant}"] if variant else []),
                          "--dataset", args.dataset, "--seed", str(args.seed)])
    ckpt = load_checkpoint(path, ("teacher", "student"), "--teacher_ckpt", hint=f"train it with: {command}")
    ckpt.setdefault("image_size", 32)  # written before checkpoints recorded it, when every dataset was 32x32
    if variant is not None:
        if ckpt.get("variant") != variant:
            have = ckpt.get("variant") or "plain"
            raise UserError(f"--teacher_ckpt: {path} holds a {have} {ckpt['kind']}, but this run needs a {variant} "
                            f"teacher; train it with: {command}")
        extras_path = path.parent / EXTRAS_FILE
        extras = load_checkpoint(extras_path, "extras", "--teacher_ckpt",
                                 hint=f"a {variant} teacher keeps its extra modules there; train it with: {command}")
        if extras.get("model_fingerprint") != ckpt["fingerprint"]:
            raise UserError(f"--teacher_ckpt: {extras_path} belongs to other weights than {path} (fingerprints "
                            f"differ); keep each teacher.pt with its own {EXTRAS_FILE}")
        ckpt["extras"] = extras
    ckpt["path"] = str(path)
    return ckpt


def build_teacher(ckpt: dict[str, Any], name: str, data: Dataset, device: torch.device, cfg: TrainConfig,
                  fold: bool = True):
    """The frozen teacher from `read_teacher`'s checkpoint, checked against the data; and its identity.

    The image size is checked before the dataset, so that a 32x32 teacher offered 64x64 data says so. With
    `fold`, what comes back is a copy with its batch norms folded into its convolutions (`models.fold_batchnorm`:
    the same outputs up to float rounding, at less cost), made after the fingerprint check.
    """
    expect_match(ckpt, "--teacher_ckpt", model=name, image_size=data.image_size, num_classes=data.num_classes,
                 dataset=data.name)
    teacher = build(name, data.num_classes, device, cfg.channels_last, data.image_size)
    load_weights(teacher, ckpt, "--teacher_ckpt")
    if model_fingerprint(teacher) != ckpt["fingerprint"]:
        raise UserError(f"--teacher_ckpt: the weights in {ckpt['path']} do not match their recorded fingerprint "
                        "(corrupt?)")
    teacher = fold_batchnorm(teacher) if fold else teacher.eval().requires_grad_(False)
    return teacher, identity(ckpt)


def heads_path(args: argparse.Namespace) -> Path:
    """Where the stage-2 heads are read from: --heads_ckpt, or stage 2's default output."""
    return Path(args.heads_ckpt or default_dir(dataset_tag(args.dataset), f"heads-{args.teacher}", args.seed)
                / "heads.pt")


def read_heads(args: argparse.Namespace) -> dict[str, Any]:
    """The stage-2 heads checkpoint (--heads_ckpt or its default place), read before any data is."""
    path = heads_path(args)
    command = shlex.join(["python3", "train_heads.py", "--teacher", args.teacher, "--dataset", args.dataset,
                          "--seed", str(args.seed)])
    ckpt = load_checkpoint(path, "heads", "--heads_ckpt", hint=f"train them with: {command}")
    ckpt["path"] = str(path)
    return ckpt


def build_heads(ckpt: dict[str, Any], teacher_identity: dict[str, Any], device: torch.device) -> IntermediateHeads:
    """The frozen stage-2 heads from `read_heads`'s checkpoint, refused unless made for this very teacher."""
    if ckpt["teacher"] != teacher_identity:
        mismatch = next(k for k in teacher_identity if ckpt["teacher"].get(k) != teacher_identity[k])
        raise UserError(
            f"--heads_ckpt: {ckpt['path']} was trained on another teacher ({mismatch} "
            f"{ckpt['teacher'].get(mismatch)!r}, this teacher has {teacher_identity[mismatch]!r}); "
            "run train_heads.py for this teacher"
        )
    heads = IntermediateHeads([(name, tuple(shape)) for name, shape in ckpt["taps"]], ckpt["num_classes"],
                              ckpt.get("grid"))
    load_weights(heads, ckpt, "--heads_ckpt")
    return heads.to(device).eval().requires_grad_(False)
