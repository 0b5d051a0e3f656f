"""MHKD's intermediate classifier: two 3x3 convs to 256 channels, global pooling, a two-layer MLP.

As in the DIH repository's `MHKD/middle_header_generator_mhkd.py` 21-48 (BASELINES.md, MHKD): both convs
unpadded and without bias, each followed by BN and ReLU. The small-map rule: the first conv is padded by 1
when the tap is smaller than 5x5 (the original's `padding` argument). ⚑ Our addition: when a map would still
be smaller than 3x3 before the second conv (a 1x1 or 2x2 tap), that conv is padded by 1 too; the original
had no such case among its taps.
"""

from __future__ import annotations

from torch import Tensor, nn

from .linear import TapShape

WIDTH = 256  # channels of both convs and of the hidden linear layer


def paddings(height: int, width: int) -> tuple[int, int]:
    """Padding of the two 3x3 convs for a tap of `height`x`width` (the small-map rule of the module docstring)."""
    side = min(height, width)
    first = 1 if side < 5 else 0
    second = 1 if side - 2 + 2 * first < 3 else 0
    return first, second


class MHKDHead(nn.Module):
    """Conv-BN-ReLU twice, global average pool, Linear-ReLU-Linear: one head on one tap."""

    def __init__(self, shape: TapShape, num_classes: int):
        super().__init__()
        channels, height, width = shape
        first, second = paddings(height, width)
        self.features = nn.Sequential(
            nn.Conv2d(channels, WIDTH, 3, padding=first, bias=False), nn.BatchNorm2d(WIDTH), nn.ReLU(inplace=True),
            nn.Conv2d(WIDTH, WIDTH, 3, padding=second, bias=False), nn.BatchNorm2d(WIDTH), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(inplace=True), nn.Linear(WIDTH, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class MHKDHeads(nn.Module):
    """One `MHKDHead` per given tap; `forward` takes a network's full tap list and reads the taps it is mounted on."""

    def __init__(self, taps: list[tuple[int, str, TapShape]], num_classes: int):
        super().__init__()
        self.taps = [(index, name, tuple(shape)) for index, name, shape in taps]
        self.heads = nn.ModuleList(MHKDHead(shape, num_classes) for _, _, shape in self.taps)

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(name for _, name, _ in self.taps)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Logits of each head, in tap order."""
        return [head(features[index]) for head, (index, _, _) in zip(self.heads, self.taps, strict=True)]
