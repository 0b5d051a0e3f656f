"""DIH's intermediate classifier heads: flatten a tapped feature map, one linear layer. Nothing else."""

from __future__ import annotations

from torch import Tensor, nn

TapShape = tuple[int, int, int]


class IntermediateHeads(nn.Module):
    """One `Linear(C*H*W, num_classes)` per teacher tap (Table 1 of the paper), trained on frozen features."""

    def __init__(self, taps: list[tuple[str, TapShape]], num_classes: int):
        super().__init__()
        self.taps = [(name, tuple(shape)) for name, shape in taps]
        self.heads = nn.ModuleList(nn.Linear(c * h * w, num_classes) for _, (c, h, w) in self.taps)

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.taps)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Logits of each head from the teacher's tapped features, in tap order."""
        return [head(feature.flatten(1)) for head, feature in zip(self.heads, features, strict=True)]
