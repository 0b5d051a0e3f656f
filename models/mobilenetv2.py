"""MobileNetV2 (Sandler et al., 2018) at width 0.5 for 32x32 inputs: RepDistiller's `mobile_half`, weight for weight.

RepDistiller's variant (its models/mobilenetv2.py, from the RCO authors): a stride-2 3x3 stem to 16 channels, seven
groups of inverted residual blocks (expansion 6, except 1 in the first group, whose block still has its 1x1 expanding
conv) at 8/12/16/32/48/80/160 channels, a 1x1 conv to 1280 channels, global average pooling (RepDistiller's
AvgPool2d over the 2x2 map of a 32x32 input; global at any size here), a linear classifier: 812,836 parameters with
100 classes.
At 32x32 the groups see 16, 16, 8, 4, 4, 2 and 2 pixels.

In the project's form: the stem is the 3x3 conv; the four tapped stages end where RepDistiller's feature methods read
its features (`feat[1:-1]`: the outputs of groups 2, 3, 5 and 7), so stage 1 holds groups 1-2, stage 2 group 3,
stage 3 groups 4-5 and stage 4 groups 6-7; the fifth stage, not tapped, is the 1x1 conv to 1280 channels.
The taps are the outputs of linear bottlenecks (no ReLU): they can be negative.
"""

from torch import Tensor, nn

from .base import TapModel, init_conv_weights

# (expansion, channels, blocks, stride) of each group at width 1; mobile_half halves the channels.
GROUPS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STAGES = ((0, 1), (2,), (3, 4), (5, 6))  # the groups of each tapped stage
LAST_CHANNELS = 1280  # RepDistiller keeps 1280 for widths up to 1


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels)]


class InvertedResidual(nn.Module):
    """1x1 expanding conv-BN-ReLU, 3x3 depthwise conv-BN-ReLU (strided), 1x1 projecting conv-BN (linear); the input
    is added where the shape does not change. `conv` keeps RepDistiller's indices (0-7)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(*conv_bn(in_channels, hidden, 1), nn.ReLU(inplace=True),
                                  *conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU(inplace=True),
                                  *conv_bn(hidden, out_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(TapModel):
    """MobileNetV2 at `width` (0.5: RepDistiller's mobile_half); see the module docstring for its stages and taps."""

    tap_names = ("group2", "group3", "group5", "group7")
    taps_nonnegative = False

    def __init__(self, num_classes: int, width: float = 0.5):
        super().__init__()
        channels = int(32 * width)
        self.stem = nn.Sequential(*conv_bn(3, channels, 3, stride=2), nn.ReLU(inplace=True))
        groups = []
        for expansion, c, n, stride in GROUPS:
            out = int(c * width)
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(InvertedResidual(channels, out, s, expansion))
                channels = out
            groups.append(nn.Sequential(*blocks))
        last = int(LAST_CHANNELS * width) if width > 1.0 else LAST_CHANNELS
        self.stages = nn.ModuleList(
            [*(nn.Sequential(*(groups[g] for g in stage)) for stage in STAGES),
             nn.Sequential(*conv_bn(channels, last, 1), nn.ReLU(inplace=True))]
        )
        self.classifier = nn.Linear(last, num_classes)
        # RepDistiller's initialisation: He-normal (fan-out) convs, Linear N(0, 0.01) with zero bias.
        init_conv_weights(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)
