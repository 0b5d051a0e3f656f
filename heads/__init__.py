"""Classifiers mounted on intermediate feature maps, one file per kind, each built from a model's tap shapes.

- `linear`: DIH's heads: flatten a teacher tap (ImageNet models: pooled first, ⚑), one Linear. Trained on the
  frozen teacher (stage 2).
- `mhkd`: MHKD's heads: two 3x3 convs to 256 channels, pooling, a two-layer MLP; on taps 1 and 2 of both the
  teacher and the student, all trained during the student's run.
- `tofd`: TOFD's auxiliary classifiers: SepConv blocks carrying each tap but the last to the last tap's width,
  pooling, a Linear; on both networks, the teacher's trained with it from scratch (`train_teacher.py --tofd`).

DIH's point against the other two: its heads are the cheapest possible, and the teacher is never retrained.
"""

from __future__ import annotations

from models import TapModel

from .linear import IntermediateHeads, TapShape
from .mhkd import MHKDHead, MHKDHeads
from .tofd import AuxiliaryClassifier, AuxiliaryClassifiers, SepConv

__all__ = ["AuxiliaryClassifier", "AuxiliaryClassifiers", "IntermediateHeads", "MHKDHead", "MHKDHeads", "SepConv",
           "TapShape", "heads_for", "mhkd_heads_for", "tofd_aux_for"]

MHKD_TAPS = (0, 1)  # MHKD mounts its heads on taps 1 and 2


def heads_for(teacher: TapModel, num_classes: int, image_size: int = 32) -> IntermediateHeads:
    """The DIH heads Table 1 mounts on `teacher`: one on each of its taps (pooled to the last tap's grid where the
    teacher asks for it: `TapModel.pooled_heads`)."""
    shapes = teacher.tap_shapes(image_size)
    grid = shapes[-1][1:] if teacher.pooled_heads else None
    return IntermediateHeads(list(zip(teacher.tap_names, shapes, strict=True)), num_classes, grid)


def mhkd_heads_for(model: TapModel, num_classes: int, image_size: int = 32) -> MHKDHeads:
    """MHKD's two heads on `model` (teacher or student), on its taps 1 and 2."""
    shapes = model.tap_shapes(image_size)
    return MHKDHeads([(i, model.tap_names[i], shapes[i]) for i in MHKD_TAPS], num_classes)


def tofd_aux_for(model: TapModel, num_classes: int, image_size: int = 32, count: int | None = None
                 ) -> AuxiliaryClassifiers:
    """TOFD's auxiliary classifiers on `model`: on every tap but the last, or on the first `count` taps."""
    shapes = model.tap_shapes(image_size)
    return AuxiliaryClassifiers(list(zip(model.tap_names, shapes, strict=True)), num_classes, count)
