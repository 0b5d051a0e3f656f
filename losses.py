"""The distillation losses of the paper, exactly as the original code computes them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def dih_loss(
    student_logits: Tensor,
    cohort_logits: Sequence[Tensor],
    target: Tensor,
    alpha: float,
    temperature: float,
    cohort_reduction: str = "sum",
) -> Tensor:
    """DIH: L = Σ_j [(1−α)·CE(s, y) + α·τ²·KL(softmax(h_j/τ) ‖ softmax(s/τ))] over the cohort h_0..h_k.

    The cross-entropy is counted once per cohort member, as in the original code; KL is the batch
    mean. `cohort_reduction="mean"` divides by the cohort size instead (an option, off by default).
    Computed in fp32 for lower-precision logits (bf16 autocast), in float64 for float64 ones; all members
    in one vectorised pass.
    """
    if cohort_reduction not in ("sum", "mean"):
        raise ValueError(f"cohort_reduction must be 'sum' or 'mean', got {cohort_reduction!r}")
    if not cohort_logits:
        raise ValueError("the cohort is empty: use plain cross-entropy for the CE baseline")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = student_logits.to(dtype)
    teachers = torch.stack([logits.to(dtype) for logits in cohort_logits])  # (k+1, B, C)
    members, batch = teachers.shape[0], student.shape[0]
    ce = F.cross_entropy(student, target)
    log_q = F.log_softmax(student / temperature, dim=1).expand_as(teachers)
    kl_sum = F.kl_div(log_q, F.softmax(teachers / temperature, dim=2), reduction="sum") / batch
    loss = members * (1 - alpha) * ce + alpha * temperature**2 * kl_sum
    return loss / members if cohort_reduction == "mean" else loss


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), batch mean: the distillation term AT and CRD add with weight α."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    p = F.softmax(teacher_logits.to(dtype) / temperature, dim=1)
    return temperature**2 * F.kl_div(log_q, p, reduction="batchmean")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float, temperature: float) -> Tensor:
    """Canonical KD (Hinton et al.): DIH with the teacher's final classifier as the only cohort member."""
    return dih_loss(student_logits, [teacher_logits], target, alpha, temperature)
