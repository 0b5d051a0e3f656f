"""VGG-11 with batch norm (Simonyan & Zisserman, 2015, configuration A), CIFAR variant.

Five stages of 3x3 conv-BN-ReLU layers, each closed by a 2x2 max-pool, take a 32x32 image down to
512x1x1; global average pooling (the identity at 32x32, and what lets larger images through) and a single
Linear(512, num_classes) classify it.
"""

from torch import nn

from .base import TapModel, init_conv_weights

# Conv widths per stage (configuration A: 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M).
STAGES = ((64,), (128,), (256, 256), (512, 512), (512, 512))


class VGG11(TapModel):
    """VGG-11-BN; the taps are the outputs of the first four max-pools (the fifth stage is not tapped)."""

    tap_names = ("pool1", "pool2", "pool3", "pool4")

    def __init__(self, num_classes: int):
        super().__init__()
        self.stem = nn.Identity()
        stages = []
        in_channels = 3
        for widths in STAGES:
            layers: list[nn.Module] = []
            for width in widths:
                # No conv bias: the BN right after it has its own.
                layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                in_channels = width
            stages.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(512, num_classes)
        init_conv_weights(self)
