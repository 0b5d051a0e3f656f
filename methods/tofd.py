"""TOFD (Zhang et al., NeurIPS 2020, task-oriented feature distillation): classifiers on both networks.

Both networks carry auxiliary classifiers (heads/tofd.py) on every tap but the last. The teacher is trained
with them from scratch (`train_teacher.py --tofd`, `TOFDTeacher` below); the student trains its own with it
and distils, stage by stage, each classifier's pooled feature (through a linear link) and its logits:

    L = Σ_i [ β·‖link_i(F^s_i) − F^t_i‖_F + CE(z^s_i, y) + SCE_{T_e}(z^s_i, z^t_i) ]
        + orth·Σ_i (‖W_i W_iᵀ − I‖_F + ‖W_iᵀ W_i − I‖_F),   T_e = 1 + 3·e/250 at 1-based epoch e

(BASELINES.md, TOFD; the DIH repository's `train_tofd.py` 150-170). The pairs are by stage: student aux_i
with teacher aux_i (as far as both have one), the main classifiers with each other. The DIH code zipped 4
logit outputs with 3 features by list index, so its shallowest classifier never got a loss and the others
were matched across depths; that bug is not copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from checkpoint import load_weights
from data import Batch
from engine import Stage, StepOutput
from heads import AuxiliaryClassifiers, tofd_aux_for
from models import Features, TapModel, fold_batchnorm

from .base import FEATURES, Method, Setup, StudentStage, TeacherOutputs

VARIANT = "tofd"  # the teacher checkpoint's `variant`, and its folder's suffix


def tofd_temperature(epoch: int) -> float:
    """T_e = 1 + 3·e/250 at 1-based epoch e, as the original (`1 + (3 / 250) * (1 + epoch)` with 0-based epoch)."""
    return 1 + 3 * epoch / 250


def tofd_loss(
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    link_weights: Sequence[Tensor],
    target: Tensor,
    temperature: float | Tensor,
    beta: float,
    orth: float,
) -> Tensor:
    """The TOFD loss of the module docstring; the i-th entries of all five lists form pair i.

    ‖·‖_F is unsquared over the whole B×d matrix (`torch.dist`); SCE_T(s, t) = −(1/B)Σ softmax(t/T)·log
    softmax(s/T), without T². `link_weights[i]` is W_i (d_t × d_s), applied as F^s_i W_iᵀ. Computed in fp32
    (float64 for float64 inputs), outside any autocast.
    """
    dtype = torch.promote_types(student_logits[0].dtype, torch.float32)
    pairs = zip(student_logits, teacher_logits, student_features, teacher_features, link_weights, strict=True)
    with torch.autocast(target.device.type, enabled=False):
        loss = torch.zeros((), dtype=dtype, device=target.device)
        for zs, zt, fs, ft, w in pairs:
            zs, zt, fs, ft, w = (v.to(dtype) for v in (zs, zt, fs, ft, w))
            loss = loss + beta * torch.linalg.matrix_norm(fs @ w.T - ft)
            loss = loss + F.cross_entropy(zs, target)
            loss = loss - (F.softmax(zt / temperature, dim=1) * F.log_softmax(zs / temperature, dim=1)).sum(1).mean()
            eye_t = torch.eye(w.shape[0], dtype=dtype, device=w.device)
            eye_s = torch.eye(w.shape[1], dtype=dtype, device=w.device)
            loss = loss + orth * (torch.linalg.matrix_norm(w @ w.T - eye_t) + torch.linalg.matrix_norm(w.T @ w - eye_s))
    return loss


def classifier_outputs(features: Features, aux: AuxiliaryClassifiers) -> tuple[list[Tensor], list[Tensor]]:
    """(logits, pooled features) of every classifier of a network, by stage: aux_1 … aux_n, then the main one."""
    logits, pooled = aux(features.taps)
    return [*logits, features.logits], [*pooled, features.pooled]


class TOFDTeacher(Stage):
    """Stage 1 of TOFD: the backbone and its auxiliary classifiers from scratch, on Σ of all their CE.

    Delivers the plain backbone as teacher.pt (any tool loads it as the model it is, with `variant="tofd"`
    recorded); the auxiliary classifiers are its extras (extras.pt beside it, tied to it by fingerprint).
    """

    def __init__(self, model: TapModel, model_name: str, aux: AuxiliaryClassifiers):
        super().__init__("teacher", model, {"aux": aux})
        self.aux = aux
        self.meta = {"model": model_name, "variant": VARIANT}

    def training_step(self, batch: Batch, shared: None = None) -> StepOutput:
        logits, _ = classifier_outputs(self.model.forward_features(batch.x), self.aux)
        # Train accuracy: of the main classifier, like the test accuracy that heads the run.
        return sum(F.cross_entropy(z.float(), batch.y) for z in logits), [logits[-1]]

    def evaluate(self, x: Tensor) -> dict[str, Tensor]:
        logits, _ = classifier_outputs(self.model.forward_features(x), self.aux)
        return {**dict(zip(self.aux.tap_names, logits[:-1], strict=True)), "model": logits[-1]}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**self.meta, "aux_taps": list(self.aux.tap_names)}

    def summary_fields(self, last: dict[str, Any]) -> dict[str, Any]:
        by_output = last["test_acc_by_output"]
        return {**self.meta, "aux_classifiers": [{"tap": tap, "final_test_acc": by_output[tap]}
                                                 for tap in self.aux.tap_names]}


class TaskOrientedDistillation(StudentStage):
    """The TOFD student: its own auxiliary classifiers and one link per classifier pair are its extras.

    The student gets auxiliary classifiers only where the teacher has a partner (a 3-tap student of a 4-tap
    teacher pairs aux_1, aux_2 and the mains; the teacher's aux_3 is not used). The teacher and its auxiliary
    classifiers run frozen, in eval mode, with their batch norms folded: the teacher in its shared pass, its
    auxiliary classifiers in the step on that pass's taps, under inference mode.
    """

    needs = frozenset({FEATURES})

    def __init__(self, setup: Setup):
        teacher, data = setup.teacher, setup.data
        teacher_aux = tofd_aux_for(teacher, data.num_classes, data.image_size)
        load_weights(nn.ModuleDict({"aux": teacher_aux}), setup.teacher_ckpt["extras"], "--teacher_ckpt")
        pairs = min(len(teacher_aux.classifiers), len(setup.student.tap_names) - 1)
        aux = tofd_aux_for(setup.student, data.num_classes, data.image_size, count=pairs)
        dims_s = [*aux.feature_dims, setup.student.feature_dim]
        dims_t = [*teacher_aux.feature_dims[:pairs], teacher.feature_dim]
        links = nn.ModuleList(nn.Linear(d_s, d_t, bias=False) for d_s, d_t in zip(dims_s, dims_t, strict=True))
        super().__init__(setup, {"aux": aux, "links": links})
        self.aux, self.links = aux, links
        teacher.eval().requires_grad_(False)
        self.teacher_aux = fold_batchnorm(teacher_aux.to(data.device))
        # A device tensor rather than a float, so that a compiled step reads each epoch's value without
        # recompiling; set from the epoch number alone, so --resume recomputes it.
        self.temperature = torch.ones((), device=data.device)

    def start_epoch(self, epoch: int) -> None:
        self.temperature.fill_(tofd_temperature(epoch))

    def teacher_classifiers(self, teacher: TeacherOutputs) -> tuple[list[Tensor], list[Tensor]]:
        """The teacher's (logits, pooled features) of the paired classifiers, by stage."""
        with torch.inference_mode():  # nothing trainable consumes these
            logits, pooled = self.teacher_aux(teacher.taps[: len(self.aux.classifiers)])
        return [*logits, teacher.logits], [*pooled, teacher.pooled]

    def training_step(self, batch: Batch, teacher: TeacherOutputs) -> StepOutput:
        teacher_logits, teacher_features = self.teacher_classifiers(teacher)
        logits, features = classifier_outputs(self.model.forward_features(batch.x), self.aux)
        h = self.hyper
        loss = tofd_loss(logits, teacher_logits, features, teacher_features, [link.weight for link in self.links],
                         batch.y, self.temperature, h["beta"], h["orth"])
        return loss, [logits[-1]]

    def evaluate(self, x: Tensor) -> dict[str, Tensor]:
        """The student's main classifier (the headline) and its auxiliary classifiers, for the record."""
        logits, _ = classifier_outputs(self.model.forward_features(x), self.aux)
        aux = {f"aux_{tap}": z for tap, z in zip(self.aux.tap_names, logits[:-1], strict=True)}
        return {"model": logits[-1], **aux}


METHOD = Method("tofd", "every classifier's pooled feature (linked) and logits, stage by stage, from a TOFD teacher",
                {"beta": 0.05, "orth": 0.03}, TaskOrientedDistillation, teacher=VARIANT)
