"""VGGs with batch norm (Simonyan & Zisserman, 2015) in their CIFAR variants.

`VGG11`, the DIH authors' VGG-11 (configuration A): five stages of 3x3 conv-BN-ReLU layers, each closed by
a 2x2 max-pool, take a 32x32 image down to 512x1x1; global average pooling (the identity at 32x32, and what
lets larger images through) and a single Linear(512, num_classes) classify it.

`BenchmarkVGG`, RepDistiller's `vgg8` and `vgg13` (its VGG class with batch norm): the same kind of blocks
with conv biases, no max-pool after the fourth block at 32x32, and a global average pool at the end.
"""

import torch.nn.functional as F
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


# RepDistiller's VGG configurations "S" (its vgg8) and "B" (its vgg13): the conv widths of its five blocks.
BENCHMARK_CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def conv_bn_relu(in_channels: int, widths: tuple[int, ...]) -> list[nn.Module]:
    """3x3 conv (with bias, as RepDistiller's) - BN - ReLU for each width."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return layers


class PoolIfWider(nn.Module):
    """A 2x2 max-pool applied only to maps wider than `side`.

    RepDistiller max-pools before its fifth block only for 64-pixel inputs (`if h == 64`), so that a 32-pixel
    image reaches that block at 4x4 and a 64-pixel one at 4x4 too; pooling whatever is wider than 4x4 is the
    same at both sizes and carries the rule to any other.
    """

    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, x):
        return F.max_pool2d(x, 2) if x.shape[-1] > self.side else x


class BenchmarkVGG(TapModel):
    """VGG-8 / VGG-13 with batch norm as RepDistiller builds them (`vgg8_bn`, `vgg13_bn`), weight for weight.

    Five conv blocks; the stem is the first, each stage a 2x2 max-pool and the next block (the fourth stage's
    pool: see `PoolIfWider`), global average pooling, Linear(512, classes). At 32x32 the blocks see 32, 16, 8,
    4 and 4 pixels. The taps are the outputs of blocks 1-4 (post-ReLU), the maps RepDistiller's feature methods
    read (its feat[1:-1]). Initialised as RepDistiller's: He-normal convs with zero bias, Linear N(0, 0.01).
    """

    tap_names = ("block1", "block2", "block3", "block4")

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        config = BENCHMARK_CONFIGS[name]
        self.stem = nn.Sequential(*conv_bn_relu(3, config[0]))
        pools = [nn.MaxPool2d(2), nn.MaxPool2d(2), nn.MaxPool2d(2), PoolIfWider(4)]
        self.stages = nn.ModuleList(
            nn.Sequential(pool, *conv_bn_relu(config[i][-1], config[i + 1])) for i, pool in enumerate(pools)
        )
        self.classifier = nn.Linear(512, num_classes)
        init_conv_weights(self)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)
