"""DIH (the paper): the teacher's final classifier and its k stage-2 heads all teach the student at once."""

from __future__ import annotations

from data import Batch
from engine import StepOutput
from losses import dih_loss

from .base import HEADS, Method, StudentStage, TeacherOutputs


class CohortDistillation(StudentStage):
    """L = Σ_j [(1−α)·CE(s, y) + α·τ²·KL(softmax(h_j/τ) ‖ softmax(s/τ))] over the cohort h_0..h_k.

    The cohort comes from the teacher's pass (once per batch, shared with the other students of a group): its
    final logits, and the heads' logits on the taps of that same pass.
    """

    needs = frozenset({HEADS})

    def training_step(self, batch: Batch, teacher: TeacherOutputs) -> StepOutput:
        cohort = [teacher.logits, *teacher.heads]
        logits = self.model(batch.x)
        h = self.hyper
        return dih_loss(logits, cohort, batch.y, h["alpha"], h["temperature"], h["cohort_reduction"]), [logits]


METHOD = Method("dih", "the teacher's final classifier and its k intermediate heads, all at once",
                {"alpha": 0.1, "temperature": 5.0, "cohort_reduction": "sum"}, CohortDistillation, heads=True)
