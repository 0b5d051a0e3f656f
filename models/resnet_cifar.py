"""The CIFAR ResNets of He et al. (2016, Sec. 4.2): ResNet-8 up to ResNet-110, as the DIH authors built them.

A 3x3 conv to 16 channels, three stages of (depth - 2) / 6 BasicBlocks at 16/32/64 channels, global
average pool, FC. Where a stage changes shape the shortcut is a projection (1x1 conv + BN), as in the code
that produced the paper's numbers (and RepDistiller's): ResNet-8 has 83,892 parameters with 100 classes,
ResNet-110 1,736,564. RepDistiller's ResNet-8x4 and -32x4 are the same networks four times as wide at the
stages (stem 32 channels, stages 64/128/256): their first stage changes width, so its first block gets a
stride-1 projection shortcut.
"""

from torch import nn

from .base import TapModel, conv_bn_relu_stem, init_conv_weights
from .resnet import make_stage

WIDTHS = (16, 16, 32, 64)  # stem, stage 1, stage 2, stage 3
WIDTHS_X4 = (32, 64, 128, 256)  # RepDistiller's resnet8x4 / resnet32x4


class CifarResNet(TapModel):
    """ResNet-`depth` for 32x32 inputs, `depth` = 6n + 2, with `widths` = (stem, stage 1, stage 2, stage 3)."""

    tap_names = ("layer1", "layer2", "layer3")

    def __init__(self, depth: int, num_classes: int, widths: tuple[int, int, int, int] = WIDTHS):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        stem, *stages = widths
        self.stem = conv_bn_relu_stem(stem)
        self.stages = nn.ModuleList(
            make_stage(stages[i - 1] if i else stem, width, n, 1 if i == 0 else 2) for i, width in enumerate(stages)
        )
        self.classifier = nn.Linear(stages[-1], num_classes)
        init_conv_weights(self)
