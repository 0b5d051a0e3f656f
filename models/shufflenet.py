"""ShuffleNet V1 (Zhang et al., 2018) and V2 (Ma et al., 2018) for 32x32 inputs: RepDistiller's `ShuffleV1` and
`ShuffleV2` (its models/ShuffleNetv1.py and ShuffleNetv2.py), weight for weight.

Both start with a 1x1 conv-BN-ReLU stem to 24 channels at full resolution (no max-pool) and have three stages, each
halving the map (16, 8 and 4 pixels at 32x32), tapped at their outputs (post-ReLU), the maps RepDistiller's feature
methods read (its `feat[1:-1]`); global average pooling (RepDistiller's 4x4 average pool at 32x32) and a linear
classifier end them. ShuffleV1: 3 groups, 240/480/960 channels, 4/8/4 blocks. ShuffleV2 (its net size 1):
116/232/464 channels, each stage a down-sampling block and 3/7/3 basic blocks, then a 1x1 conv-BN-ReLU to 1024
channels, our fourth stage (not tapped), before the pooling.

The channel shuffle and V2's channel split are written with channel counts fixed at construction, so that
`torch.fx` traces the networks and every BN folds into its convolution (models/fold.py).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TapModel


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """(B, g·n, H, W) → the channels read column-wise from a g x n table: channel i·n + j goes to j·g + i."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def stem() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 conv-BN-ReLU, channel shuffle, 3x3 depthwise conv-BN (strided), grouped 1x1 conv-BN; added to the
    input, or at stride 2 concatenated with the input's 3x3 average pool; ReLU.

    As in RepDistiller, the first 1x1 conv is not grouped where it reads the 24-channel stem (nor is its shuffle, of
    one group, anything but the identity) and the bottleneck is a quarter of the block's own output width."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        mid = out_planes // 4
        self.first_groups = 1 if in_planes == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleV1(TapModel):
    """RepDistiller's ShuffleV1: see the module docstring."""

    tap_names = ("layer1", "layer2", "layer3")

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (240, 480, 960), blocks: tuple[int, ...] = (4, 8, 4),
                 groups: int = 3):
        super().__init__()
        self.stem = stem()
        stages, in_planes = [], 24
        for width, count in zip(widths, blocks, strict=True):
            # The first block of a stage concatenates its input: its own branch makes the rest of the width.
            layers = [ShuffleV1Block(in_planes, width - in_planes, 2, groups)]
            layers += [ShuffleV1Block(width, width, 1, groups) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            in_planes = width
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(widths[-1], num_classes)  # PyTorch's default initialisation, as RepDistiller's


class ShuffleV2Block(nn.Module):
    """The basic block: the input split in halves; one half passes, the other goes through 1x1 conv-BN-ReLU, 3x3
    depthwise conv-BN, 1x1 conv-BN-ReLU; the halves concatenated and shuffled (2 groups)."""

    def __init__(self, channels: int):
        super().__init__()
        self.half = half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        kept, x = x[:, : self.half], x[:, self.half:]
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class ShuffleV2Down(nn.Module):
    """The down-sampling block: two branches of the whole input, each ending at half the output width — 3x3 depthwise
    conv-BN (stride 2), 1x1 conv-BN-ReLU; and 1x1 conv-BN-ReLU, 3x3 depthwise conv-BN (stride 2), 1x1 conv-BN-ReLU —
    concatenated and shuffled (2 groups)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleV2(TapModel):
    """RepDistiller's ShuffleV2 (net size 1): see the module docstring."""

    tap_names = ("layer1", "layer2", "layer3")

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (116, 232, 464), blocks: tuple[int, ...] = (3, 7, 3),
                 last: int = 1024):
        super().__init__()
        self.stem = stem()
        stages, in_channels = [], 24
        for width, count in zip(widths, blocks, strict=True):
            blocks_of_stage = [ShuffleV2Down(in_channels, width), *(ShuffleV2Block(width) for _ in range(count))]
            stages.append(nn.Sequential(*blocks_of_stage))
            in_channels = width
        stages.append(nn.Sequential(nn.Conv2d(in_channels, last, 1, bias=False), nn.BatchNorm2d(last),
                                    nn.ReLU(inplace=True)))
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(last, num_classes)  # PyTorch's default initialisation, as RepDistiller's
