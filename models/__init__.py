"""Model registry: every teacher and student the scripts can name, built by `build_model`.

torchvision's ImageNet models keep torchvision's names (resnet18, resnet34, resnet50, mobilenet_v2).
RepDistiller's benchmark models under our names: resnet8..resnet110 are res8..res110, resnet8x4 and
resnet32x4 are res8x4 and res32x4, vgg8 and vgg13 (its vgg8_bn, vgg13_bn) are vgg8 and vgg13, and wrn_16_2,
wrn_40_1, wrn_40_2 keep their names, and its ResNet50, MobileNetV2 (mobile_half), ShuffleV1 and ShuffleV2 are
res50, mobilenetv2, shufflev1 and shufflev2 (`REPDISTILLER_NAMES`). Its vgg11 is not our vgg11 (the DIH authors').
"""

from collections.abc import Callable
from functools import partial

from .base import Features, TapModel
from .fold import count_batchnorms, fold_batchnorm
from .mobilenetv2 import MobileNetV2
from .resnet import Bottleneck, ResNet
from .resnet_cifar import WIDTHS_X4, CifarResNet
from .shufflenet import ShuffleV1, ShuffleV2
from .torchvision_nets import TorchvisionMobileNetV2, TorchvisionResNet
from .vgg import VGG11, BenchmarkVGG
from .wrn import WideResNet

__all__ = ["MODEL_NAMES", "REPDISTILLER_NAMES", "TORCHVISION_NAMES", "Features", "TapModel", "build_model",
           "count_batchnorms", "fold_batchnorm"]

_BUILDERS: dict[str, Callable[..., TapModel]] = {
    "res8": partial(CifarResNet, 8),
    "res14": partial(CifarResNet, 14),
    "res20": partial(CifarResNet, 20),
    "res32": partial(CifarResNet, 32),
    "res44": partial(CifarResNet, 44),
    "res56": partial(CifarResNet, 56),
    "res110": partial(CifarResNet, 110),
    "res8x4": partial(CifarResNet, 8, widths=WIDTHS_X4),
    "res32x4": partial(CifarResNet, 32, widths=WIDTHS_X4),
    "res18": partial(ResNet, (2, 2, 2, 2)),
    "res34": partial(ResNet, (3, 4, 6, 3)),
    "res50": partial(ResNet, (3, 4, 6, 3), block=Bottleneck),
    "vgg11": VGG11,
    "vgg8": partial(BenchmarkVGG, "vgg8"),
    "vgg13": partial(BenchmarkVGG, "vgg13"),
    "wrn_16_2": partial(WideResNet, 16, 2),
    "wrn_28_2": partial(WideResNet, 28, 2),
    "wrn_40_1": partial(WideResNet, 40, 1),
    "wrn_40_2": partial(WideResNet, 40, 2),
    "mobilenetv2": MobileNetV2,
    "shufflev1": ShuffleV1,
    "shufflev2": ShuffleV2,
    # torchvision's ImageNet models, under torchvision's names (models/torchvision_nets.py)
    "resnet18": partial(TorchvisionResNet, "resnet18"),
    "resnet34": partial(TorchvisionResNet, "resnet34"),
    "resnet50": partial(TorchvisionResNet, "resnet50"),
    "mobilenet_v2": TorchvisionMobileNetV2,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)

# Our name -> RepDistiller's (and mdistiller's): its model_dict keys and its teacher folders `<name>_vanilla`.
REPDISTILLER_NAMES: dict[str, str] = {
    **{f"res{depth}": f"resnet{depth}" for depth in (8, 14, 20, 32, 44, 56, 110)},
    "res8x4": "resnet8x4", "res32x4": "resnet32x4", "vgg8": "vgg8", "vgg13": "vgg13",
    "wrn_16_2": "wrn_16_2", "wrn_40_1": "wrn_40_1", "wrn_40_2": "wrn_40_2",
    "res50": "ResNet50", "mobilenetv2": "MobileNetV2", "shufflev1": "ShuffleV1", "shufflev2": "ShuffleV2",
}

# torchvision's ImageNet models (models/torchvision_nets.py), which import torchvision's own weight files.
TORCHVISION_NAMES: tuple[str, ...] = tuple(name for name, build in _BUILDERS.items() if getattr(build, "func", build)
                                           in (TorchvisionResNet, TorchvisionMobileNetV2))


def build_model(name: str, num_classes: int) -> TapModel:
    """Build the model called `name` (one of MODEL_NAMES) with a `num_classes`-way classifier."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](num_classes=num_classes)
