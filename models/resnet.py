"""ResNet-18/34/50 for 32x32 inputs (He et al., 2016), in the form usual for CIFAR.

Differs from the ImageNet model only in the stem: one stride-1 3x3 conv and no max-pool, so the four
stages see 32, 16, 8 and 4 pixel maps. `BasicBlock` and `make_stage` also build the CIFAR ResNets.
ResNet-50 (`Bottleneck` blocks, four times as wide at the output of each stage) is RepDistiller's `ResNet50`
(its models/resnetv2.py), weight for weight: 23,705,252 parameters with 100 classes.
"""

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import TapModel, conv_bn_relu_stem, init_conv_weights


def shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """A residual block's shortcut: the identity, or a projection (strided 1x1 conv + BN) where the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, ReLU after the sum.

    Where the block changes shape, the shortcut is a projection (strided 1x1 conv + BN), as in the
    DIH authors' code, RepDistiller and torchvision; elsewhere it is the identity.
    """

    expansion = 1  # output width / `planes`

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 conv to `planes`, 3x3 conv (strided), 1x1 conv to 4·`planes`, each with BN, plus a shortcut, ReLU after
    the sum. The shortcut is a projection (strided 1x1 conv + BN) where the shape changes, as in RepDistiller's
    ResNet50 and torchvision (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = shortcut(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


Block = type[BasicBlock] | type[Bottleneck]


def make_stage(in_planes: int, planes: int, num_blocks: int, stride: int, block: Block = BasicBlock
               ) -> nn.Sequential:
    """`num_blocks` blocks; the first one applies `stride` and the change of width."""
    out_planes = planes * block.expansion
    blocks = [block(in_planes, planes, stride)]
    blocks += [block(out_planes, planes, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ResNet(TapModel):
    """3x3 stem, four stages of `block`s at 64/128/256/512 channels (× 4 at the output for Bottlenecks), global
    average pool, FC."""

    tap_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_blocks: Sequence[int], num_classes: int, block: Block = BasicBlock):
        super().__init__()
        self.stem = conv_bn_relu_stem(64)
        expansion = block.expansion
        planes = (64, 128, 256, 512)
        inputs = (64, *(expansion * p for p in planes[:-1]))
        self.stages = nn.ModuleList(
            make_stage(inputs[i], width, n, stride=1 if i == 0 else 2, block=block)
            for i, (width, n) in enumerate(zip(planes, num_blocks, strict=True))
        )
        self.classifier = nn.Linear(expansion * 512, num_classes)
        init_conv_weights(self)
