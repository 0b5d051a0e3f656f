"""FitNets (Romero et al., 2015): first fit the student's first stage to the teacher's (hints), then KD.

Two phases in one run folder:
- "hint" (`--hint_epochs`, 40 by default, constant lr): L = MSE(g(tap1_s), tap1_t), the mean over B·C·H·W.
  Only the student's stem and first stage and the regressor g learn; nothing else of the student runs.
- "kd" (`--epochs`, fresh optimizer and schedule, from the hint phase's last weights): plain KD(α, T); g is
  dropped.
g is the identity where the two tap-1 shapes match (every CIFAR-ResNet pair), else RepDistiller's regressor.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from data import Batch
from engine import Phase, StepOutput, trainable_parameters
from utils import UserError

from .base import FIRST_TAP, Method, Setup, TeacherOutputs
from .kd import KnowledgeDistillation


class Regressor(nn.Module):
    """Maps a student feature map onto the teacher's shape: conv (by the sizes), BN, and ReLU where the teacher
    tap cannot be negative (RepDistiller's ConvReg)."""

    def __init__(self, student: tuple[int, int, int], teacher: tuple[int, int, int], relu: bool):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = student, teacher
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise UserError(f"FitNets: no regressor maps a {s_c}x{s_h}x{s_w} student tap onto a "
                            f"{t_c}x{t_h}x{t_w} teacher tap (the student's map must not be smaller, or half)")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


def regressor_for(student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int],
                  teacher_nonnegative: bool) -> nn.Module:
    """The identity where shapes match, else a `Regressor`."""
    if tuple(student_shape) == tuple(teacher_shape):
        return nn.Identity()
    return Regressor(student_shape, teacher_shape, relu=teacher_nonnegative)


class FitNets(KnowledgeDistillation):
    def __init__(self, setup: Setup):
        image_size = setup.data.image_size
        student_tap = setup.student.tap_shapes(image_size)[0]
        teacher_tap = setup.teacher.tap_shapes(image_size)[0]
        regressor = regressor_for(student_tap, teacher_tap, setup.teacher.taps_nonnegative)
        extras = {} if isinstance(regressor, nn.Identity) else {"regressor": regressor}
        super().__init__(setup, extras)
        self.regressor = regressor

    def phases(self, epochs: int) -> list[Phase]:
        hint_params = trainable_parameters(self.model.layers_to_tap(0), self.regressor)
        return [Phase("hint", self.hyper["hint_epochs"], hint_params, self.hint_step, constant_lr=True,
                      needs=frozenset({FIRST_TAP})),
                Phase("kd", epochs, trainable_parameters(self.model), self.training_step, needs=self.needs)]

    def hint_step(self, batch: Batch, teacher: TeacherOutputs) -> StepOutput:
        hint = self.regressor(self.model.forward_to_tap(batch.x, 0))
        return F.mse_loss(hint.float(), teacher.taps[0].float()), []


# ⚑ The regressor's form for unequal shapes is RepDistiller's; FitNets' paper and the DIH code only use equal ones.
METHOD = Method("fitnets", "stage-1 feature maps (hint phase, through a regressor), then softened logits",
                {"alpha": 0.1, "temperature": 5.0, "hint_epochs": 40}, FitNets)
