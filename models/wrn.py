"""Wide ResNets, WRN-depth-k (Zagoruyko & Komodakis, 2016), without dropout.

A 3x3 conv to 16 channels, three groups of (depth - 4) / 6 pre-activation blocks at 16k/32k/64k
channels, a final BN-ReLU, global average pool, FC.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from .base import TapModel, init_conv_weights


class WideBlock(nn.Module):
    """Pre-activation block: (BN-ReLU-conv3x3) twice, plus a 1x1 conv shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None  # identity
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # As in the reference code, a projection shortcut reads the pre-activated input.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


def make_group(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """`num_blocks` WideBlocks; the first one applies `stride` and the change of width."""
    blocks = [WideBlock(in_planes, planes, stride)]
    blocks += [WideBlock(planes, planes, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class WideResNet(TapModel):
    """WRN-`depth`-`widen_factor`, `depth` = 6n + 4; the taps are the three group outputs (pre-activation)."""

    tap_names = ("group1", "group2", "group3")
    taps_nonnegative = False

    def __init__(self, depth: int, widen_factor: int, num_classes: int):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stages = nn.ModuleList(
            [make_group(16, widths[0], n, 1), make_group(widths[0], widths[1], n, 2),
             make_group(widths[1], widths[2], n, 2)]
        )
        self.bn = nn.BatchNorm2d(widths[2])
        self.classifier = nn.Linear(widths[2], num_classes)
        init_conv_weights(self)

    def pool(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(x)).mean(dim=(2, 3))
