"""What every student method shares: its description, its hyper-parameters, the stage it builds, and the
teacher's pass that all students of one teacher share.

A method is a `Method` record (name, one line on what it transfers, its hyper-parameters with their
defaults, what it needs from disk) plus a `build` function that turns a `Setup` (student, frozen teacher,
resolved hyper-parameters) into an `engine.Stage`. The engine never learns which method it runs.

A student's step does not run its teacher: it receives the teacher's outputs on the batch (`TeacherOutputs`),
computed once per batch by the `TeacherPass` that every student of that teacher shares, and declares what it
reads of them (its `needs`), so that a pass serves a group of KD students without computing DIH's heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from data import Batch, Dataset
from engine import Needs, SharedPass, Stage
from models import TapModel

# What a student's phase may read of the teacher's pass. A full pass gives the logits, its taps and pooled feature
# with them at no extra cost (`TapModel.forward` is `forward_features`); "heads" adds DIH's stage-2 heads on the
# taps; "first_tap" alone runs only the stem and first stage (FitNets' hint phase).
LOGITS, FEATURES, HEADS, FIRST_TAP = "logits", "features", "heads", "first_tap"


class TeacherOutputs(NamedTuple):
    """What the frozen teacher computed on a batch; None where the reading phase did not ask for it."""

    logits: Tensor | None
    taps: list[Tensor] | None  # FitNets' hint phase: the first tap only
    pooled: Tensor | None
    heads: list[Tensor] | None  # logits of DIH's stage-2 heads, in tap order


class TeacherPass(SharedPass):
    """The frozen teacher's forward on a batch, once for every student of a group, under `no_grad` rather than
    inference mode, since trainable modules (CRD's embedding, MHKD's teacher heads) take its outputs as input.

    Students must not modify its outputs in place: the other students of the group read the same tensors.
    """

    def __init__(self, teacher: TapModel, heads: nn.Module | None = None):
        self.teacher, self.heads = teacher, heads

    def __call__(self, batch: Batch, needs: Needs) -> TeacherOutputs:
        with torch.no_grad():
            if needs == {FIRST_TAP}:
                return TeacherOutputs(None, [self.teacher.forward_to_tap(batch.x, 0)], None, None)
            logits, taps, pooled = self.teacher.forward_features(batch.x)
            heads = self.heads(taps) if HEADS in needs else None
            return self.select(TeacherOutputs(logits, taps, pooled, heads), needs)

    def select(self, outputs: TeacherOutputs, needs: Needs) -> TeacherOutputs:
        """Only what `needs` asks for, the same whether computed for it alone or for a group."""
        features, full_pass = FEATURES in needs, bool(needs - {FIRST_TAP})
        taps = outputs.taps if features else outputs.taps[:1] if FIRST_TAP in needs else None
        return TeacherOutputs(outputs.logits if full_pass else None, taps, outputs.pooled if features else None,
                              outputs.heads if HEADS in needs else None)


INPUTS = ("teacher", "teacher_ckpt", "heads_ckpt", "ta", "ta_ckpt")  # the flags that name what a method reads


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
    data: Dataset
    meta: dict[str, Any]  # what the student checkpoint and summary.json record about the run
    heads: nn.Module | None = None  # DIH's stage-2 heads, frozen
    teacher_ckpt: dict[str, Any] | None = None  # the teacher's checkpoint as read (its "path" included)
    teacher_pass: TeacherPass | None = None  # shared by the students of a group; else made from teacher and heads
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

    @property
    def inputs(self) -> tuple[str, ...]:
        """The flags naming what it reads from disk (of `INPUTS`): its teacher, DIH's heads, TAKD's assistant."""
        reads = {"teacher": self.teacher != "none", "teacher_ckpt": self.teacher != "none", "heads_ckpt": self.heads,
                 "ta": self.assistant, "ta_ckpt": self.assistant}
        return tuple(flag for flag in INPUTS if reads[flag])

    @property
    def accepts(self) -> tuple[str, ...]:
        """Every flag it takes beyond the common ones (and --out_dir): its inputs, then its hyper-parameters. A
        flag that no method of a command accepts is refused."""
        return (*self.inputs, *self.defaults)


class StudentStage(Stage):
    """Stage 3 of any method: delivers the plain student; records the method's identity with it.

    `needs` (class attribute) is what its step reads of the teacher's pass (LOGITS, FEATURES, HEADS, FIRST_TAP).
    The stage keeps no reference to the teacher network: a method's `build` may read its shapes from the `Setup`,
    its step reads the teacher's outputs only as the shared pass hands them over, so that in a group the teacher
    runs once per batch for every student (tests/test_groups.py counts its forwards).
    """

    def __init__(self, setup: Setup, extras: dict[str, nn.Module] | None = None):
        super().__init__("student", setup.student, extras)
        self.hyper, self.meta, self.inputs = setup.hyper, setup.meta, setup.provenance
        if setup.teacher is not None:
            self.shared_pass = setup.teacher_pass or TeacherPass(setup.teacher, setup.heads)

    def checkpoint_meta(self) -> dict[str, Any]:
        return self.meta

    def summary_fields(self, last: dict[str, Any]) -> dict[str, Any]:
        return self.meta

    def provenance(self) -> dict[str, dict[str, str]]:
        return self.inputs
