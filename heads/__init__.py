"""DIH's intermediate classifier heads: flatten a tapped feature map, one linear layer. Nothing else."""

from __future__ import annotations

from torch import Tensor, nn

from models import TapModel


class IntermediateHeads(nn.Module):
    """One `Linear(C*H*W, num_classes)` per teacher tap (Table 1 of the paper), trained on frozen features."""

    def __init__(self, taps: list[tuple[str, tuple[int, int, int]]], num_classes: int):
        super().__init__()
        self.taps = [(name, tuple(shape)) for name, shape in taps]
        self.heads = nn.ModuleList(nn.Linear(c * h * w, num_classes) for _, (c, h, w) in self.taps)

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.taps)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Logits of each head from the teacher's tapped features, in tap order."""
        return [head(feature.flatten(1)) for head, feature in zip(self.heads, features, strict=True)]


def heads_for(teacher: TapModel, num_classes: int) -> IntermediateHeads:
    """The heads Table 1 mounts on `teacher`: one on each of its taps."""
    return IntermediateHeads(list(zip(teacher.tap_names, teacher.tap_shapes(), strict=True)), num_classes)
