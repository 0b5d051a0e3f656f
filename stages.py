"""Stages 1 and 2 as plug-ins of the one training engine (stage 3, the student, is in methods/)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from data import Batch
from engine import Stage, StepOutput
from heads import IntermediateHeads
from models import TapModel, fold_batchnorm


class TeacherTraining(Stage):
    """Stage 1: cross-entropy training of one model of the zoo."""

    def __init__(self, model: TapModel, model_name: str, meta: dict[str, Any] | None = None):
        super().__init__("teacher", model)
        self.meta = {"model": model_name, **(meta or {})}

    def training_step(self, batch: Batch, shared: None = None) -> StepOutput:
        logits = self.model(batch.x)
        return F.cross_entropy(logits.float(), batch.y), [logits]

    def checkpoint_meta(self) -> dict[str, Any]:
        return self.meta

    def summary_fields(self, last: dict[str, Any]) -> dict[str, Any]:
        return self.meta


class HeadsTraining(Stage):
    """Stage 2: the heads learn from a frozen teacher's features (sum of the heads' cross-entropies).

    The teacher stays in eval mode with gradients off, so neither its weights nor its BN running
    statistics can change; its own final classifier is evaluated alongside the heads as a check. The
    training steps read a copy with its batch norms folded (cheaper, equal up to float rounding); evaluation
    reads the teacher as given, so that its classifier's test accuracy is stage 1's to the last image.
    """

    def __init__(self, teacher: TapModel, heads: IntermediateHeads, teacher_identity: dict[str, Any],
                 teacher_file: str = ""):
        super().__init__("heads", heads)
        self.teacher = teacher.eval().requires_grad_(False)
        self.folded_teacher = fold_batchnorm(self.teacher)
        self.teacher_identity, self.teacher_file = teacher_identity, teacher_file
        self.headline = heads.tap_names

    def training_step(self, batch: Batch, shared: None = None) -> StepOutput:
        with torch.no_grad():
            taps = self.folded_teacher.forward_features(batch.x).taps
        logits = self.model(taps)
        return sum(F.cross_entropy(out.float(), batch.y) for out in logits), logits

    def evaluate(self, x: Tensor) -> dict[str, Tensor]:
        final, taps, _ = self.teacher.forward_features(x)
        return {**dict(zip(self.headline, self.model(taps), strict=True)), "final": final}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "model": self.teacher_identity["model"],
            "teacher": self.teacher_identity,
            "taps": [[name, list(shape)] for name, shape in self.model.taps],
            **({"grid": list(self.model.grid)} if self.model.grid is not None else {}),
        }

    def provenance(self) -> dict[str, dict[str, str]]:
        return {"teacher": {"file": self.teacher_file, "fingerprint": self.teacher_identity["fingerprint"]}}

    def summary_fields(self, last: dict[str, Any]) -> dict[str, Any]:
        by_output = last["test_acc_by_output"]
        return {
            "model": self.teacher_identity["model"],
            "teacher_fingerprint": self.teacher_identity["fingerprint"],
            "heads": [{"tap": name, "final_test_acc": by_output[name]} for name in self.headline],
            "final_classifier_test_acc": by_output["final"],
        }
