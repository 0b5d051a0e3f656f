"""torchvision's ImageNet models under torchvision's names: resnet18, resnet34, resnet50 and mobilenet_v2.

Each is built by torchvision's own constructor (so its blocks, initialisation and random draws are torchvision's)
and regrouped into the TapModel form: the stem, four stages tapped at their outputs, a global average pool and a
linear classifier. The regrouping moves modules, it computes nothing new: with the same weights the logits are
torchvision's (tests/test_torchvision_nets.py). The state-dict keys are ours (`stem.*`, `stages.*`,
`classifier.*`); importing.py maps torchvision's weight files onto them.

These models also ask for pooled DIH heads (`pooled_heads`, see heads/linear.py): at 224 pixels a flatten-linear
head on ResNet-34's first stage alone would hold 200 M parameters.
"""

from __future__ import annotations

import torchvision
from torch import Tensor, nn

from .base import TapModel

# mobilenet_v2's `features` indices that end each stage: where the resolution halves next (56, 28, 14, 7 pixels at
# 224), the last one being its final 1x1 convolution to 1280 channels.
MOBILENET_V2_STAGE_ENDS = (3, 6, 13, 18)


class TorchvisionResNet(TapModel):
    """torchvision's ResNet: stem conv1-bn1-relu-maxpool, stages layer1..layer4, average pool, fc."""

    tap_names = ("layer1", "layer2", "layer3", "layer4")
    pooled_heads = True

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.classifier = net.fc


class TorchvisionMobileNetV2(TapModel):
    """torchvision's MobileNetV2: `features` cut into a stem (features 0-1) and four stages at features 3, 6, 13
    and 18 (see MOBILENET_V2_STAGE_ENDS); its classifier's dropout (p=0.2) runs in `pool`, before the Linear."""

    tap_names = tuple(f"features.{end}" for end in MOBILENET_V2_STAGE_ENDS)
    pooled_heads = True

    def __init__(self, num_classes: int):
        super().__init__()
        net = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
        features = list(net.features)
        self.stem = nn.Sequential(*features[:2])
        starts = (2, *(end + 1 for end in MOBILENET_V2_STAGE_ENDS[:-1]))
        self.stages = nn.ModuleList(nn.Sequential(*features[start:end + 1])
                                    for start, end in zip(starts, MOBILENET_V2_STAGE_ENDS, strict=True))
        self.dropout, self.classifier = net.classifier[0], net.classifier[1]

    def pool(self, x: Tensor) -> Tensor:
        return self.dropout(x.mean(dim=(2, 3)))
