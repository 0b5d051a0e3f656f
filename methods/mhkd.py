"""MHKD (Wang et al., 2020, multi-head KD): trainable heads on the frozen teacher teach heads on the student.

Two MHKD heads (heads/mhkd.py) on taps 1 and 2 of each network. The teacher's backbone stays frozen; its
heads are trained from scratch during the student's run, in the same optimizer as the student and the
student's heads (BASELINES.md, MHKD; the DIH repository's `MHKD/mhkd_training.py` 192-217):

    L = KD(s, t; α, T) + Σ_{i=1,2} [ CE(h^t_i, y) + β·KD(h^s_i, h^t_i; α, T) ],   KD = (1−α)·CE + α·T²·KL_T

with α = 0.1, T = 4, β = 0.5. As in the original code the head-KD term is not detached from the teacher's
heads, so it also pulls them toward the student's; `--detach` detaches it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from data import Batch
from engine import StepOutput
from heads import mhkd_heads_for
from losses import kd_loss

from .base import FEATURES, Method, Setup, StudentStage, TeacherOutputs


def mhkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_heads: Sequence[Tensor],
    teacher_heads: Sequence[Tensor],
    target: Tensor,
    alpha: float,
    temperature: float,
    beta: float,
    detach: bool,
) -> Tensor:
    """The MHKD loss of the module docstring; `student_heads[i]` and `teacher_heads[i]` sit on the same tap.

    Computed in fp32 (float64 for float64 inputs). With `detach`, the head-KD terms treat the teacher heads'
    logits as constants (their CE still trains them).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    loss = kd_loss(student_logits, teacher_logits, target, alpha, temperature)
    for h_s, h_t in zip(student_heads, teacher_heads, strict=True):
        loss = loss + F.cross_entropy(h_t.to(dtype), target)
        loss = loss + beta * kd_loss(h_s, h_t.detach() if detach else h_t, target, alpha, temperature)
    return loss


class MultiHeadDistillation(StudentStage):
    """The MHKD student; its heads and the teacher's (trainable, on the frozen teacher's taps) are its extras."""

    needs = frozenset({FEATURES})

    def __init__(self, setup: Setup):
        classes, size = setup.data.num_classes, setup.data.image_size
        self.student_heads = mhkd_heads_for(setup.student, classes, size)
        self.teacher_heads = mhkd_heads_for(setup.teacher, classes, size)
        super().__init__(setup, {"student_heads": self.student_heads, "teacher_heads": self.teacher_heads})
        setup.teacher.eval().requires_grad_(False)  # only its heads learn: the backbone and BN statistics stay

    def training_step(self, batch: Batch, teacher: TeacherOutputs) -> StepOutput:
        student = self.model.forward_features(batch.x)
        h = self.hyper
        loss = mhkd_loss(student.logits, teacher.logits, self.student_heads(student.taps),
                         self.teacher_heads(teacher.taps), batch.y, h["alpha"], h["temperature"], h["beta"],
                         h["detach"])
        return loss, [student.logits]

    def evaluate(self, x: Tensor) -> dict[str, Tensor]:
        """The student (the headline) and, for the record, every head of both networks."""
        student = self.model.forward_features(x)
        teacher_taps = self.shared_pass(Batch(x, None, None), self.needs).taps  # (the pass reads the images only)
        outputs = {"model": student.logits}
        for network, heads, taps in (("student", self.student_heads, student.taps),
                                     ("teacher", self.teacher_heads, teacher_taps)):
            outputs |= {f"{network}_head_{tap}": z for tap, z in zip(heads.tap_names, heads(taps), strict=True)}
        return outputs


METHOD = Method("mhkd", "the softened logits of heads trained on the teacher's taps 1-2, to heads on the student's",
                {"alpha": 0.1, "temperature": 4.0, "beta": 0.5, "detach": False}, MultiHeadDistillation)
