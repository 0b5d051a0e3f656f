"""KD (Hinton et al., 2015): the teacher's softened final logits, L = (1−α)·CE + α·T²·KL_T(t‖s)."""

from __future__ import annotations

from data import Batch
from engine import StepOutput
from losses import kd_loss

from .base import LOGITS, Method, Setup, StudentStage, TeacherOutputs


class KnowledgeDistillation(StudentStage):
    """Canonical KD from a frozen teacher; TAKD's two legs and FitNets' second phase are this too."""

    needs = frozenset({LOGITS})

    def training_step(self, batch: Batch, teacher: TeacherOutputs) -> StepOutput:
        logits = self.model(batch.x)
        return kd_loss(logits, teacher.logits, batch.y, self.hyper["alpha"], self.hyper["temperature"]), [logits]


def build(setup: Setup) -> KnowledgeDistillation:
    return KnowledgeDistillation(setup)


METHOD = Method("kd", "the teacher's softened final logits", {"alpha": 0.1, "temperature": 5.0}, build)
