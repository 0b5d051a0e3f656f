"""The interface every backbone implements: stem → stages → pooled feature → linear classifier.

Every model of the zoo has the same four parts, so every distillation method reads any architecture the
same way: the outputs of the first `len(tap_names)` stages are its "taps" (where DIH mounts its heads and
feature methods compare maps), `pool` turns the last stage's map into the penultimate feature vector
(what CRD embeds), and `classifier` is the final Linear layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class Features(NamedTuple):
    """Everything one forward pass computes that a method may need."""

    logits: Tensor
    taps: list[Tensor]  # feature map after each tapped stage, in depth order
    pooled: Tensor  # (B, feature_dim): the input of the final classifier


class TapModel(nn.Module):
    """A classifier built as `stem`, `stages`, `pool` and `classifier` (see the module docstring).

    Subclasses set `stem` (a module), `stages` (an `nn.ModuleList`), `classifier` (an `nn.Linear`) and
    `tap_names` (one name per tapped stage, from the first). They override `pool` where the pooled
    feature is more than a global average (WRN's final BN-ReLU).
    """

    tap_names: tuple[str, ...] = ()
    # False where a tap can hold negative values (pre-activation WRN groups): FitNets' regressor then
    # has no final ReLU.
    taps_nonnegative: bool = True
    # True where DIH's heads average-pool each tap to the last tap's grid before their Linear (the ImageNet
    # models: heads/linear.py); False: the paper's flatten-linear heads.
    pooled_heads: bool = False
    stem: nn.Module
    stages: nn.ModuleList
    classifier: nn.Linear

    def pool(self, x: Tensor) -> Tensor:
        """Last stage's map (B, C, H, W) → the penultimate feature vector (B, C): global average pooling."""
        return x.mean(dim=(2, 3))

    def forward_features(self, x: Tensor) -> Features:
        """Logits, tapped feature maps and pooled feature in one pass (a frozen teacher runs once per batch)."""
        x = self.stem(x)
        taps = []
        for stage in self.stages:
            x = stage(x)
            taps.append(x)
        pooled = self.pool(x)
        return Features(self.classifier(pooled), taps[: len(self.tap_names)], pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).logits

    def forward_to_tap(self, x: Tensor, tap: int) -> Tensor:
        """The feature map at tap `tap` (0-based), running only the stem and the stages up to it."""
        x = self.stem(x)
        for stage in self.stages[: tap + 1]:
            x = stage(x)
        return x

    def layers_to_tap(self, tap: int) -> nn.ModuleList:
        """The modules that `forward_to_tap(x, tap)` runs (FitNets' hint phase trains exactly these)."""
        return nn.ModuleList([self.stem, *self.stages[: tap + 1]])

    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature vector."""
        return self.classifier.in_features

    def tap_shapes(self, image_size: int = 32) -> list[tuple[int, int, int]]:
        """(C, H, W) of each tap for a square RGB input of `image_size` pixels.

        Runs one batch-1 forward pass in eval mode (BN reads its running statistics instead of updating
        them) without autograd, then restores every submodule's train/eval flag: no side effects.
        """
        modes = [(module, module.training) for module in self.modules()]
        weight = next(self.parameters())
        x = torch.zeros(1, 3, image_size, image_size, device=weight.device, dtype=weight.dtype)
        self.eval()
        try:
            with torch.no_grad():
                taps = self.forward_features(x).taps
        finally:
            for module, training in modes:
                module.training = training
        return [tuple(t.shape[1:]) for t in taps]


def init_conv_weights(model: nn.Module) -> None:
    """He-normal init (fan-out, as in torchvision and the WRN reference code) for every conv layer.

    BatchNorm (weight 1, bias 0) and Linear keep PyTorch's defaults.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def conv_bn_relu_stem(out_channels: int) -> nn.Sequential:
    """The CIFAR stem shared by the ResNets: one stride-1 3x3 conv, BN, ReLU (no max-pool)."""
    return nn.Sequential(nn.Conv2d(3, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))
