"""KD (Hinton et al., 2015): the teacher's softened final logits, L = (1−α)·CE + α·T²·KL_T(t‖s)."""

from __future__ import annotations

import torch
from torch import Tensor

from data import Batch
from engine import StepOutput
from losses import kd_loss

from .base import Method, Setup, StudentStage


class KnowledgeDistillation(StudentStage):
    """Canonical KD from a frozen teacher; TAKD's two legs and FitNets' second phase are this too."""

    def teacher_logits(self, x: Tensor) -> Tensor:
        with torch.inference_mode():  # nothing trainable consumes these: the fastest mode is safe
            return self.teacher(x)

    def training_step(self, batch: Batch) -> StepOutput:
        target = self.teacher_logits(batch.x)
        logits = self.model(batch.x)
        return kd_loss(logits, target, batch.y, self.hyper["alpha"], self.hyper["temperature"]), [logits]


def build(setup: Setup) -> KnowledgeDistillation:
    return KnowledgeDistillation(setup)


METHOD = Method("kd", "the teacher's softened final logits", {"alpha": 0.1, "temperature": 5.0}, build)
