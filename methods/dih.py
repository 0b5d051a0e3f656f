"""DIH (the paper): the teacher's final classifier and its k stage-2 heads all teach the student at once."""

from __future__ import annotations

import torch
from torch import Tensor

from data import Batch
from engine import StepOutput
from losses import dih_loss

from .base import Method, Setup, StudentStage


class CohortDistillation(StudentStage):
    """L = Σ_j [(1−α)·CE(s, y) + α·τ²·KL(softmax(h_j/τ) ‖ softmax(s/τ))] over the cohort h_0..h_k.

    The cohort runs once per batch under inference mode: one teacher pass yields the final logits and
    every tapped feature the heads need.
    """

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.heads = setup.heads

    def cohort(self, x: Tensor) -> list[Tensor]:
        """Logits of every cohort member, the teacher's final classifier first."""
        with torch.inference_mode():
            final, taps, _ = self.teacher.forward_features(x)
            return [final, *self.heads(taps)]

    def training_step(self, batch: Batch) -> StepOutput:
        cohort = self.cohort(batch.x)
        logits = self.model(batch.x)
        h = self.hyper
        return dih_loss(logits, cohort, batch.y, h["alpha"], h["temperature"], h["cohort_reduction"]), [logits]


METHOD = Method("dih", "the teacher's final classifier and its k intermediate heads, all at once",
                {"alpha": 0.1, "temperature": 5.0, "cohort_reduction": "sum"}, CohortDistillation, heads=True)
