"""DIH's intermediate classifier heads: flatten a tapped feature map, one linear layer. Nothing else.

⚑ For large images (the ImageNet models, `TapModel.pooled_heads`) each tap is first average-pooled to the last
tap's grid (7x7 at 224 pixels): a flatten-linear head on ResNet-34's first stage (64x56x56) would hold 200 M
parameters for 1000 classes, pooled to 7x7 it holds 3.1 M. The paper's CIFAR heads (`grid=None`) are unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

TapShape = tuple[int, int, int]


class IntermediateHeads(nn.Module):
    """One `Linear(C*H*W, num_classes)` per teacher tap (Table 1 of the paper), trained on frozen features.

    With `grid` (H', W'), each tap is adaptive-average-pooled to H' x W' first and its Linear reads C*H'*W'.
    """

    def __init__(self, taps: list[tuple[str, TapShape]], num_classes: int, grid: tuple[int, int] | None = None):
        super().__init__()
        self.taps = [(name, tuple(shape)) for name, shape in taps]
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.heads = nn.ModuleList(nn.Linear(self._inputs(shape), num_classes) for _, shape in self.taps)

    def _inputs(self, shape: TapShape) -> int:
        c, h, w = shape
        return c * h * w if self.grid is None else c * self.grid[0] * self.grid[1]

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.taps)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Logits of each head from the teacher's tapped features, in tap order."""
        if self.grid is not None:
            features = [F.adaptive_avg_pool2d(feature, self.grid) for feature in features]
        return [head(feature.flatten(1)) for head, feature in zip(self.heads, features, strict=True)]
