"""The CIFAR ResNets of He et al. (2016, Sec. 4.2): ResNet-8 up to ResNet-110, as the DIH authors built them.

A 3x3 conv to 16 channels, three stages of (depth - 2) / 6 BasicBlocks at 16/32/64 channels, global
average pool, FC. Where a stage changes shape the shortcut is a projection (1x1 conv stride 2 + BN), as
in the code that produced the paper's numbers (and RepDistiller's): ResNet-8 has 83,892 parameters with
100 classes, ResNet-110 1,736,564.
"""

from torch import nn

from .base import TapModel, conv_bn_relu_stem, init_conv_weights
from .resnet import make_stage


class CifarResNet(TapModel):
    """ResNet-`depth` for 32x32 inputs, `depth` = 6n + 2."""

    tap_names = ("layer1", "layer2", "layer3")

    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.stem = conv_bn_relu_stem(16)
        self.stages = nn.ModuleList([make_stage(16, 16, n, 1), make_stage(16, 32, n, 2), make_stage(32, 64, n, 2)])
        self.classifier = nn.Linear(64, num_classes)
        init_conv_weights(self)
