"""DKD, decoupled knowledge distillation (Zhao et al., CVPR 2022), as mdistiller computes it.

KD's KL divergence splits into a target-class term and a non-target-class term, which DKD weights apart:

    TCKD = T²·KL([p_y, 1 − p_y] ‖ [q_y, 1 − q_y])     the target class against all the others, p = softmax(t/T)
    NCKD = T²·KL(p̂ ‖ q̂)                               p̂, q̂: softmax over the non-target classes only
    L    = CE(s, y) + min(e / warmup, 1)·(α·TCKD + β·NCKD)     at 1-based epoch e

each KL the batch mean (mdistiller's DKD.py and engine/trainer.py, which counts epochs from 1). Defaults are
mdistiller's CIFAR-100 settings (CE weight 1, α 1, β 8, T 4, warm-up 20 epochs); its configs set β per pair
(the repdistiller-cifar100 preset does too). As mdistiller, the non-target softmaxes take the target logit
down by 1000 (after dividing by T) rather than dropping it: in fp32 and fp64 its probability is then exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from data import Batch
from engine import StepOutput

from .base import Method, Setup, TeacherOutputs
from .kd import KnowledgeDistillation

MASK = 1000.0  # taken off the target logit (over T) in the non-target softmaxes, as mdistiller does


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float, beta: float,
             temperature: float) -> Tensor:
    """α·TCKD + β·NCKD of the module docstring (without the warm-up), in fp32 (float64 for float64 logits)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s, t = student_logits.to(dtype) / temperature, teacher_logits.to(dtype) / temperature
    is_target = torch.zeros_like(s).scatter_(1, target[:, None], 1.0)  # no host check of the labels: graph-safe

    def binary(logits: Tensor) -> Tensor:
        """(B, 2): probability of the target class, and of all the others together."""
        p = F.softmax(logits, dim=1)
        return torch.stack([(p * is_target).sum(1), (p * (1 - is_target)).sum(1)], dim=1)

    tckd = F.kl_div(binary(s).log(), binary(t), reduction="batchmean")
    nckd = F.kl_div(F.log_softmax(s - MASK * is_target, dim=1), F.softmax(t - MASK * is_target, dim=1),
                    reduction="batchmean")
    return temperature**2 * (alpha * tckd + beta * nckd)


def warmup_weight(epoch: int, warmup: int) -> float:
    """min(e / warmup, 1) at 1-based epoch e: 1/20 in the first epoch, 1 from the 20th on (mdistiller's)."""
    return min(epoch / warmup, 1.0)


class DecoupledKD(KnowledgeDistillation):
    def __init__(self, setup: Setup):
        super().__init__(setup)
        # A device tensor set before each epoch from its number alone: --resume recomputes it, and a compiled or
        # graphed step reads the new value without recompiling.
        self.weight = torch.zeros((), device=setup.data.device)

    def start_epoch(self, epoch: int) -> None:
        self.weight.fill_(warmup_weight(epoch, self.hyper["warmup"]))

    def training_step(self, batch: Batch, teacher: TeacherOutputs) -> StepOutput:
        logits = self.model(batch.x)
        h = self.hyper
        kd = dkd_loss(logits, teacher.logits, batch.y, h["alpha"], h["beta"], h["temperature"])
        return F.cross_entropy(logits.float(), batch.y) + self.weight * kd, [logits]


METHOD = Method("dkd", "softened final logits, target and non-target classes weighted apart (warmed up)",
                {"alpha": 1.0, "temperature": 4.0, "beta": 8.0, "warmup": 20}, DecoupledKD)
