"""What every student method shares: its description, its hyper-parameters, and the stage it builds.

A method is a `Method` record (name, one line on what it transfers, its hyper-parameters with their
defaults, what it needs from disk) plus a `build` function that turns a `Setup` (student, frozen teacher,
resolved hyper-parameters) into an `engine.Stage`. The engine never learns which method it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from data import DeviceDataset
from engine import Stage
from models import Features, TapModel


@dataclass(frozen=True)
class Hyper:
    """One hyper-parameter flag of test_dih.py: its type, a check of its value, and its help text."""

    type: type
    help: str
    valid: Callable[[Any], bool] = lambda value: True
    rule: str = ""
    code: str = ""  # how the run folder's name spells it (empty: only shown when not the default)


HYPERS: dict[str, Hyper] = {
    "alpha": Hyper(float, "weight of the KD term (DKD: of its target-class term)", lambda v: 0 <= v <= 1,
                   "in [0, 1]", "a"),
    "temperature": Hyper(float, "softmax temperature of the KD term", lambda v: v > 0, "positive", "t"),
    "beta": Hyper(float, "weight of the method's own term (feature, attention, contrastive, head KD; DKD: its "
                         "non-target-class term)", lambda v: v >= 0, "non-negative", "b"),
    "cohort_reduction": Hyper(str, "sum the DIH loss over the cohort (the paper's code) or average it",
                              lambda v: v in ("sum", "mean"), "sum or mean"),
    "hint_epochs": Hyper(int, "epochs of FitNets' hint phase", lambda v: v >= 1, "at least 1", "h"),
    "nce_k": Hyper(int, "CRD: negatives per sample", lambda v: v >= 1, "at least 1"),
    "nce_t": Hyper(float, "CRD: temperature of the contrast scores", lambda v: v > 0, "positive"),
    "nce_m": Hyper(float, "CRD: momentum of the memory banks", lambda v: 0 <= v < 1, "in [0, 1)"),
    "feat_dim": Hyper(int, "CRD: width of the embeddings", lambda v: v >= 1, "at least 1"),
    "orth": Hyper(float, "TOFD: weight of the links' orthogonality term", lambda v: v >= 0, "non-negative"),
    "warmup": Hyper(int, "DKD: epochs over which its distillation terms ramp up (weight min(e/warmup, 1) at epoch e)",
                    lambda v: v >= 1, "at least 1"),
    "detach": Hyper(bool, "MHKD: detach the teacher heads' logits in the KD terms (off: the original code)"),
}


@dataclass
class Setup:
    """Everything a method's `build` may use: the networks, the resolved hyper-parameters, the data's shape."""

    student: TapModel
    teacher: TapModel | None  # frozen (eval mode, no gradients); for TAKD, the assistant
    hyper: dict[str, Any]
    data: DeviceDataset
    meta: dict[str, Any]  # what the student checkpoint and summary.json record about the run
    heads: nn.Module | None = None  # DIH's stage-2 heads, frozen
    teacher_ckpt: dict[str, Any] | None = None  # the teacher's checkpoint as read (its "path" included)
    provenance: dict[str, dict[str, str]] = field(default_factory=dict)  # file and fingerprint of each input network
    batch_size: int | None = None  # of training, where known: a method may check that its memory needs fit


@dataclass(frozen=True)
class Method:
    """A distillation method as test_dih.py and reproduce.py see it."""

    name: str
    transfers: str  # one line: what passes from teacher to student
    defaults: dict[str, Any]  # every hyper-parameter it takes, with its default (BASELINES.md)
    build: Callable[[Setup], Stage]
    teacher: str = "plain"  # "plain": a trained model; "tofd": a TOFD teacher; "none": no teacher
    heads: bool = False  # needs DIH's stage-2 heads
    assistant: bool = False  # learns from a teacher assistant (TAKD)


class StudentStage(Stage):
    """Stage 3 of any method: delivers the plain student; records the method's identity with it."""

    def __init__(self, setup: Setup, extras: dict[str, nn.Module] | None = None):
        super().__init__("student", setup.student, extras)
        self.setup, self.hyper = setup, setup.hyper
        self.teacher = setup.teacher

    def teacher_features(self, x: Tensor) -> Features:
        """The frozen teacher's outputs; `no_grad` rather than inference mode, since trainable modules
        (CRD's embedding, MHKD's teacher heads) take them as input."""
        with torch.no_grad():
            return self.teacher.forward_features(x)

    def checkpoint_meta(self) -> dict[str, Any]:
        return self.setup.meta

    def summary_fields(self, last: dict[str, Any]) -> dict[str, Any]:
        return self.setup.meta

    def provenance(self) -> dict[str, dict[str, str]]:
        return self.setup.provenance
