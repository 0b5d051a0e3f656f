"""The CIFAR ResNets of He et al. (2016, Sec. 4.2): ResNet-8 up to ResNet-110.

A 3x3 conv to 16 channels, three stages of (depth - 2) / 6 BasicBlocks at 16/32/64 channels, global
average pool, FC. Shortcuts are option A (subsample + zero channels), which adds no parameters, so the
counts match the paper's (0.27M for ResNet-20 up to 1.7M for ResNet-110).
"""

import torch.nn.functional as F
from torch import Tensor, nn

from .base import TapModel, init_conv_weights
from .resnet import make_stage


class CifarResNet(TapModel):
    """ResNet-`depth` for 32x32 inputs, `depth` = 6n + 2."""

    tap_names = ("layer1", "layer2", "layer3")

    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = make_stage(16, 16, n, stride=1, shortcut="A")
        self.layer2 = make_stage(16, 32, n, stride=2, shortcut="A")
        self.layer3 = make_stage(32, 64, n, stride=2, shortcut="A")
        self.fc = nn.Linear(64, num_classes)
        init_conv_weights(self)

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return self.fc(f3.mean(dim=(2, 3))), [f1, f2, f3]
