"""The three DIH stages as plug-ins of the one training engine (see `engine.Stage`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from heads import IntermediateHeads
from losses import dih_loss
from models import TapModel


class Supervised:
    """Cross-entropy training of one model: stage 1 (the teacher) and the CE baseline student."""

    headline = ("model",)

    def __init__(self, model: TapModel, model_name: str, kind: str = "teacher", extra: dict[str, Any] | None = None):
        self.kind, self.trainable, self.model_name = kind, model, model_name
        self.extra = extra or {}

    def training_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        logits = self.trainable(x)
        return F.cross_entropy(logits.float(), y), [logits]

    def evaluate(self, x: Tensor) -> dict[str, Tensor]:
        return {"model": self.trainable(x)}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"model": self.model_name, **self.extra}

    def summary_fields(self, last: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model_name, **self.extra}


class HeadsTraining:
    """Stage 2: the heads learn from a frozen teacher's features (sum of the heads' cross-entropies).

    The teacher stays in eval mode with gradients off, so neither its weights nor its BN running
    statistics can change; its own final classifier is evaluated alongside the heads as a check.
    """

    kind = "heads"

    def __init__(self, teacher: TapModel, heads: IntermediateHeads, teacher_identity: dict[str, Any]):
        self.teacher = teacher.eval().requires_grad_(False)
        self.trainable, self.teacher_identity = heads, teacher_identity
        self.headline = heads.tap_names

    def training_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        with torch.no_grad():
            _, features = self.teacher.forward_taps(x)
        logits = self.trainable(features)
        return sum(F.cross_entropy(out.float(), y) for out in logits), logits

    def evaluate(self, x: Tensor) -> dict[str, Tensor]:
        final, features = self.teacher.forward_taps(x)
        return {**dict(zip(self.headline, self.trainable(features), strict=True)), "final": final}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "model": self.teacher_identity["model"],
            "teacher": self.teacher_identity,
            "taps": [[name, list(shape)] for name, shape in self.trainable.taps],
        }

    def summary_fields(self, last: dict[str, Any]) -> dict[str, Any]:
        by_output = last["test_acc_by_output"]
        return {
            "model": self.teacher_identity["model"],
            "teacher_fingerprint": self.teacher_identity["fingerprint"],
            "heads": [{"tap": name, "final_test_acc": by_output[name]} for name in self.headline],
            "final_classifier_test_acc": by_output["final"],
        }


class Distillation:
    """Stage 3: a student taught by a frozen cohort — the teacher's final classifier, then its heads (if any).

    With heads this is DIH; without, canonical KD. The cohort runs once per batch under inference
    mode: one teacher pass yields the final logits and every tapped feature the heads need.
    """

    kind = "student"
    headline = ("model",)

    def __init__(
        self,
        student: TapModel,
        teacher: TapModel,
        heads: IntermediateHeads | None,
        alpha: float,
        temperature: float,
        cohort_reduction: str,
        extra: dict[str, Any],
    ):
        self.trainable, self.teacher = student, teacher.eval().requires_grad_(False)
        self.heads = heads.eval().requires_grad_(False) if heads is not None else None
        self.alpha, self.temperature, self.cohort_reduction = alpha, temperature, cohort_reduction
        self.extra = extra

    def cohort(self, x: Tensor) -> list[Tensor]:
        """Logits of every cohort member, the teacher's final classifier first."""
        with torch.inference_mode():
            if self.heads is None:
                return [self.teacher(x)]
            final, features = self.teacher.forward_taps(x)
            return [final, *self.heads(features)]

    def training_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        cohort = self.cohort(x)
        logits = self.trainable(x)
        loss = dih_loss(logits, cohort, y, self.alpha, self.temperature, self.cohort_reduction)
        return loss, [logits]

    def evaluate(self, x: Tensor) -> dict[str, Tensor]:
        return {"model": self.trainable(x)}

    def checkpoint_meta(self) -> dict[str, Any]:
        return self.extra

    def summary_fields(self, last: dict[str, Any]) -> dict[str, Any]:
        return self.extra
