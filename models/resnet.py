"""ResNet-18/34 for 32x32 inputs (He et al., 2016), in the form usual for CIFAR.

Differs from the ImageNet model only in the stem: one stride-1 3x3 conv and no max-pool, so the four
stages see 32, 16, 8 and 4 pixel maps. `BasicBlock` and `make_stage` also build the CIFAR ResNets.
"""

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import TapModel, conv_bn_relu_stem, init_conv_weights


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, ReLU after the sum.

    Where the block changes shape, the shortcut is a projection (strided 1x1 conv + BN), as in the
    DIH authors' code, RepDistiller and torchvision; elsewhere it is the identity.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """`num_blocks` BasicBlocks; the first one applies `stride` and the change of width."""
    blocks = [BasicBlock(in_planes, planes, stride)]
    blocks += [BasicBlock(planes, planes, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ResNet(TapModel):
    """3x3 stem, four stages of BasicBlocks at 64/128/256/512 channels, global average pool, FC."""

    tap_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_blocks: Sequence[int], num_classes: int):
        super().__init__()
        self.stem = conv_bn_relu_stem(64)
        widths = (64, 128, 256, 512)
        self.stages = nn.ModuleList(
            make_stage(widths[max(i - 1, 0)], width, n, stride=1 if i == 0 else 2)
            for i, (width, n) in enumerate(zip(widths, num_blocks, strict=True))
        )
        self.classifier = nn.Linear(512, num_classes)
        init_conv_weights(self)
