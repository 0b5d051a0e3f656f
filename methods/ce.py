"""CE: the student trained alone on the labels, the floor every distillation method must beat."""

from __future__ import annotations

import torch.nn.functional as F

from data import Batch
from engine import StepOutput

from .base import Method, StudentStage


class CrossEntropy(StudentStage):
    def training_step(self, batch: Batch, teacher: None = None) -> StepOutput:
        logits = self.model(batch.x)
        return F.cross_entropy(logits.float(), batch.y), [logits]


METHOD = Method("ce", "nothing: labels only (the baseline)", {}, CrossEntropy, teacher="none")
