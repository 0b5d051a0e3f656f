"""ResNet-18/34 for 32x32 inputs (He et al., 2016), in the form usual for CIFAR.

Differs from the ImageNet model only in the stem: one stride-1 3x3 conv and no max-pool, so the four
stages see 32, 16, 8 and 4 pixel maps. `BasicBlock` and `make_stage` also build the CIFAR ResNets.
"""

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from .base import TapModel, init_conv_weights

Shortcut = Literal["A", "B"]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride` and zero-pad the new channels, with no parameters."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride = stride
        self.pad = (extra_channels // 2, extra_channels - extra_channels // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, ReLU after the sum.

    Where the block changes shape the shortcut is option B of the paper (strided 1x1 conv + BN) or,
    with `shortcut="A"`, the parameter-free `PadShortcut` that the paper's CIFAR ResNets use.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(stride, planes - in_planes)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_stage(
    in_planes: int, planes: int, num_blocks: int, stride: int, shortcut: Shortcut = "B"
) -> nn.Sequential:
    """`num_blocks` BasicBlocks; the first one applies `stride` and the change of width."""
    blocks = [BasicBlock(in_planes, planes, stride, shortcut)]
    blocks += [BasicBlock(planes, planes, 1, shortcut) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ResNet(TapModel):
    """3x3 stem, four stages of BasicBlocks at 64/128/256/512 channels, global average pool, FC."""

    tap_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_blocks: Sequence[int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = make_stage(64, 64, num_blocks[0], stride=1)
        self.layer2 = make_stage(64, 128, num_blocks[1], stride=2)
        self.layer3 = make_stage(128, 256, num_blocks[2], stride=2)
        self.layer4 = make_stage(256, 512, num_blocks[3], stride=2)
        self.fc = nn.Linear(512, num_classes)
        init_conv_weights(self)

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return self.fc(f4.mean(dim=(2, 3))), [f1, f2, f3, f4]
