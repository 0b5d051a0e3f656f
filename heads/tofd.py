"""TOFD's auxiliary classifiers: SepConv blocks that carry a tap down to the last tap's width and size.

As in the TOFD authors' code (`resnet_cifar_tofd.py` 25-40, 192-348; BASELINES.md, TOFD): one auxiliary
classifier per tap before the last; the one on tap i is a chain of SepConv blocks following the network's
own channel progression (tap j's channels → tap j+1's, each halving the map) up to the last tap, then global
average pooling and its own Linear(C_last, classes). A CIFAR ResNet gets 16→32→64 and 32→64, a ResNet-18/34
64→128→256→512, 128→256→512 and 256→512.

⚑ VGG-11 and WRN (the sources are silent or broken) follow the same rule. For VGG-11 the auxiliary
classifiers on pool1..pool3 are carried to pool4's 512 channels and 2x2 map, while the network's own
classifier reads its fifth, untapped stage (512x1x1, pooled): the deepest tap gets no auxiliary classifier,
exactly as for the other architectures.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .linear import TapShape


class SepConv(nn.Sequential):
    """Depthwise 3x3 stride 2 → 1x1 → BN → ReLU → depthwise 3x3 → 1x1 to `c_out` → BN → ReLU, no biases."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )


class AuxiliaryClassifier(nn.Module):
    """SepConv blocks along `channels` (c_tap, ..., c_last), global average pool, Linear(c_last, classes)."""

    def __init__(self, channels: Sequence[int], num_classes: int):
        super().__init__()
        self.blocks = nn.Sequential(*(SepConv(a, b) for a, b in zip(channels[:-1], channels[1:], strict=True)))
        self.fc = nn.Linear(channels[-1], num_classes)

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, pooled feature): the feature is what TOFD distils for this classifier."""
        pooled = self.blocks(x).mean(dim=(2, 3))
        return self.fc(pooled), pooled


class AuxiliaryClassifiers(nn.Module):
    """The auxiliary classifiers on the first `count` taps (all but the last by default), shallowest first."""

    def __init__(self, taps: list[tuple[str, TapShape]], num_classes: int, count: int | None = None):
        super().__init__()
        count = len(taps) - 1 if count is None else count
        if not 0 <= count < len(taps):
            raise ValueError(f"{len(taps)} taps carry at most {len(taps) - 1} auxiliary classifiers, not {count}")
        channels = [shape[0] for _, shape in taps]
        self.tap_names = tuple(name for name, _ in taps[:count])
        self.classifiers = nn.ModuleList(AuxiliaryClassifier(channels[i:], num_classes) for i in range(count))

    @property
    def feature_dims(self) -> list[int]:
        return [aux.feature_dim for aux in self.classifiers]

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(logits, pooled features) of each auxiliary classifier, from a network's tap list."""
        outputs = [aux(x) for aux, x in zip(self.classifiers, features, strict=False)]
        return [logits for logits, _ in outputs], [pooled for _, pooled in outputs]
