"""AT, attention transfer (Zagoruyko & Komodakis, 2017): the student learns where the teacher looks.

a(f) = L2-normalise(vec(mean_c f_c²)) per sample; L = CE + β·Σ_l mean_{b,i}(a(f^s_l) − a(f^t_l))² + α·T²·KL_T.
Taps are paired from the shallowest and the longer list is truncated (a 4-tap teacher with a 3-tap student
pairs taps 1-3); where the maps differ in size the larger is average-pooled down to the smaller; channel
counts may differ, since the map averages over channels. No extra modules. (RepDistiller's AT.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from data import Batch
from engine import StepOutput
from losses import soft_kl

from .base import FEATURES, Method, StudentStage, TeacherOutputs


def attention_map(feature: Tensor) -> Tensor:
    """(B, C, H, W) → (B, H·W): the channel-mean of squared activations, L2-normalised per sample."""
    return F.normalize(feature.float().pow(2).mean(dim=1).flatten(1), dim=1)


def same_size(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two maps down to the smaller's height and width."""
    s, t = student.shape[-1], teacher.shape[-1]
    if s > t:
        student = F.adaptive_avg_pool2d(student, teacher.shape[-2:])
    elif t > s:
        teacher = F.adaptive_avg_pool2d(teacher, student.shape[-2:])
    return student, teacher


def at_loss(student_taps: Sequence[Tensor], teacher_taps: Sequence[Tensor]) -> Tensor:
    """Σ over paired taps of the mean squared difference of their attention maps."""
    pairs = [same_size(s, t) for s, t in zip(student_taps, teacher_taps, strict=False)]
    return sum((attention_map(s) - attention_map(t)).pow(2).mean() for s, t in pairs)


class AttentionTransfer(StudentStage):
    needs = frozenset({FEATURES})

    def training_step(self, batch: Batch, teacher: TeacherOutputs) -> StepOutput:
        student = self.model.forward_features(batch.x)
        h = self.hyper
        loss = F.cross_entropy(student.logits.float(), batch.y) + h["beta"] * at_loss(student.taps, teacher.taps)
        if h["alpha"]:
            loss = loss + h["alpha"] * soft_kl(student.logits, teacher.logits, h["temperature"])
        return loss, [student.logits]


# ⚑ β = 1000, α = 0: RepDistiller's recommended AT setting (T only matters when α > 0; 4 is RepDistiller's).
METHOD = Method("at", "attention maps (channel-mean of squared activations) of paired stages",
                {"alpha": 0.0, "temperature": 4.0, "beta": 1000.0}, AttentionTransfer)
