"""Classifiers mounted on intermediate feature maps, one file per kind.

- `linear`: DIH's heads, one flatten + Linear per teacher tap, trained on the frozen teacher (stage 2).
"""

from __future__ import annotations

from models import TapModel

from .linear import IntermediateHeads, TapShape

__all__ = ["IntermediateHeads", "TapShape", "heads_for"]


def heads_for(teacher: TapModel, num_classes: int, image_size: int = 32) -> IntermediateHeads:
    """The DIH heads Table 1 mounts on `teacher`: one on each of its taps."""
    shapes = teacher.tap_shapes(image_size)
    return IntermediateHeads(list(zip(teacher.tap_names, shapes, strict=True)), num_classes)
