"""Model registry: every teacher and student the scripts can name, built by `build_model`."""

from collections.abc import Callable
from functools import partial

from .base import Features, TapModel
from .fold import count_batchnorms, fold_batchnorm
from .resnet import ResNet
from .resnet_cifar import CifarResNet
from .vgg import VGG11
from .wrn import WideResNet

__all__ = ["MODEL_NAMES", "Features", "TapModel", "build_model", "count_batchnorms", "fold_batchnorm"]

_BUILDERS: dict[str, Callable[..., TapModel]] = {
    "res8": partial(CifarResNet, 8),
    "res14": partial(CifarResNet, 14),
    "res20": partial(CifarResNet, 20),
    "res32": partial(CifarResNet, 32),
    "res44": partial(CifarResNet, 44),
    "res56": partial(CifarResNet, 56),
    "res110": partial(CifarResNet, 110),
    "res18": partial(ResNet, (2, 2, 2, 2)),
    "res34": partial(ResNet, (3, 4, 6, 3)),
    "vgg11": VGG11,
    "wrn_16_2": partial(WideResNet, 16, 2),
    "wrn_28_2": partial(WideResNet, 28, 2),
    "wrn_40_2": partial(WideResNet, 40, 2),
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int) -> TapModel:
    """Build the model called `name` (one of MODEL_NAMES) with a `num_classes`-way classifier."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](num_classes=num_classes)
