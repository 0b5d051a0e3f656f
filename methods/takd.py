"""TAKD (Mirzadeh et al., 2020): a teacher assistant bridges the gap, teacher → TA → student, each leg KD.

The assistant is an ordinary KD student of the teacher, trained by `test_dih.py --method kd` into its default
folder; `--method takd` finds it there (or takes `--ta_ckpt`), checks that it was distilled from this very
teacher, and trains the student by KD from it. Both legs use the same α and T: KD's defaults, or the --alpha and
--temperature given, under which the assistant is looked for too. The run records the assistant's file.
"""

from __future__ import annotations

import argparse
import functools
import shlex
from typing import Any

import torch

from checkpoint import load_checkpoint
from cli import default_dir
from data import dataset_tag
from models import build_model
from utils import UserError

from .base import Method
from .kd import METHOD as KD
from .kd import KnowledgeDistillation


@functools.cache  # building a model, even on the meta device, takes 0.1 s: the sweep's report asks hundreds of times
def parameter_count(name: str) -> int:
    """Parameters of a model of the zoo, counted without allocating its weights."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name, 10).parameters())


def default_assistant(teacher: str) -> str | None:
    """⚑ res20 for every teacher larger than res20, res14 for a res20 teacher, none for smaller ones.

    The TAKD authors used ResNet-20 for ResNet-110 → ResNet-8 on CIFAR-100; DIH names no assistant.
    """
    if teacher == "res20":
        return "res14"
    return "res20" if parameter_count(teacher) > parameter_count("res20") else None


def read_assistant(args: argparse.Namespace, teacher_ckpt: dict[str, Any]) -> dict[str, Any]:
    """The assistant's checkpoint (`--ta_ckpt` or the KD student's default folder), checked to descend from the
    teacher in `teacher_ckpt`; read before any data is loaded."""
    from methods import run_name  # the registry imports this module

    ta = args.ta or default_assistant(args.teacher)
    if ta is None:
        raise UserError(f"--method takd: no default assistant for a {args.teacher} teacher (TAKD needs one smaller "
                        "than the teacher): pass --ta NAME")
    hyper = {"alpha": args.alpha, "temperature": args.temperature}  # as given, or KD's defaults (students.resolve)
    kd_run = run_name(ta, "kd", args.teacher, hyper)
    path = args.ta_ckpt or default_dir(dataset_tag(args.dataset), kd_run, args.seed) / "student.pt"
    command = shlex.join(["python3", "test_dih.py", "--method", "kd", "--student", ta, "--teacher", args.teacher,
                          *(["--teacher_ckpt", args.teacher_ckpt] if args.teacher_ckpt else []),
                          "--dataset", args.dataset, "--seed", str(args.seed),
                          *[f"--{key}={value:g}" for key, value in hyper.items() if value != KD.defaults[key]]])
    ckpt = load_checkpoint(path, "student", "--ta_ckpt", hint=f"train the assistant with: {command}")
    if ckpt.get("model") != ta:
        raise UserError(f"--ta_ckpt: {path} holds a {ckpt.get('model')}, not the assistant {ta}")
    if ckpt.get("teacher_fingerprint") != teacher_ckpt["fingerprint"]:
        raise UserError(f"--ta_ckpt: {path} was not distilled from this teacher ({teacher_ckpt['path']}); "
                        f"train the assistant with: {command}")
    ckpt["path"] = str(path)
    return ckpt


METHOD = Method("takd", "softened logits through a teacher assistant (teacher → TA → student, KD each leg)",
                dict(KD.defaults), KnowledgeDistillation, assistant=True)
