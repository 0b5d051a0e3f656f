"""Other codebases' state dicts, described here from their model definitions (never from ours), for the tests.

`repdistiller_shapes(name, classes)` lists every entry of the state dict of RepDistiller's (and mdistiller's:
the same files) model `name` — resnet*, resnet*x4, wrn_*, vgg8/vgg13 with batch norm — with its shape, as
RepDistiller's models/resnet.py, models/wrn.py and models/vgg.py build them: `conv1`/`bn1` stems, `layerL.B`
blocks with `downsample.0/1` projections, `blockG.layer.B` WRN blocks with `convShortcut`, `blockI.J` VGG
layers with conv biases (J counts conv, BN, ReLU), `fc` or `classifier`. The DIH authors' CIFAR ResNets
(models_repo/tiny_resnets.py, ResNet_Cifar) name their weights exactly as RepDistiller's resnets do.
`reference_logits` is their forward pass in eval mode, written with torch.nn.functional on such a state dict
by its key names alone: where the imported weights sit in our model, it must give the same logits.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

RESNETS = {  # name: (depth, (stem, stage 1, stage 2, stage 3) widths)
    **{f"resnet{d}": (d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, (32, 64, 128, 256)), "resnet32x4": (32, (32, 64, 128, 256)),
}
WRNS = {"wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}
VGGS = {"vgg8": [[64], [128], [256], [512], [512]],
        "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]}
BN_PARAMETERS, BN_BUFFERS = ("weight", "bias"), ("running_mean", "running_var", "num_batches_tracked")


def bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.{k}": (channels,) for k in ("weight", "bias", "running_mean", "running_var")}
    return {**shapes, f"{prefix}.num_batches_tracked": ()}


def basic_blocks(in_planes: int, widths: list[int], blocks: list[int], shortcut: str) -> dict[str, tuple[int, ...]]:
    """The `layerL.B` basic blocks of a ResNet (stride 2 at each layer's first block but the first layer's), with a
    1x1 projection named `shortcut` (`.0` conv, `.1` BN) wherever the shape changes."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, (planes, count) in enumerate(zip(widths, blocks, strict=True), 1):
        for block in range(count):
            p = f"layer{layer}.{block}"
            stride = 2 if layer > 1 and block == 0 else 1
            shapes |= {f"{p}.conv1.weight": (planes, in_planes, 3, 3), **bn(f"{p}.bn1", planes),
                       f"{p}.conv2.weight": (planes, planes, 3, 3), **bn(f"{p}.bn2", planes)}
            if stride != 1 or in_planes != planes:
                shapes |= {f"{p}.{shortcut}.0.weight": (planes, in_planes, 1, 1), **bn(f"{p}.{shortcut}.1", planes)}
            in_planes = planes
    return shapes


def repdistiller_shapes(name: str, classes: int) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of RepDistiller's model `name` and its shape, in its own order."""
    shapes: dict[str, tuple[int, ...]] = {}
    if name in RESNETS:
        depth, (stem, *widths) = RESNETS[name]
        shapes |= {"conv1.weight": (stem, 3, 3, 3), **bn("bn1", stem)}
        shapes |= basic_blocks(stem, widths, [(depth - 2) // 6] * len(widths), "downsample")
        shapes |= {"fc.weight": (classes, widths[-1]), "fc.bias": (classes,)}
    elif name in WRNS:
        depth, k = WRNS[name]
        channels = [16, 16 * k, 32 * k, 64 * k]
        shapes["conv1.weight"] = (16, 3, 3, 3)
        for group in (1, 2, 3):
            for block in range((depth - 4) // 6):
                p = f"block{group}.layer.{block}"
                c_in, c_out = (channels[group - 1] if block == 0 else channels[group]), channels[group]
                shapes |= {**bn(f"{p}.bn1", c_in), f"{p}.conv1.weight": (c_out, c_in, 3, 3), **bn(f"{p}.bn2", c_out),
                           f"{p}.conv2.weight": (c_out, c_out, 3, 3)}
                if c_in != c_out:
                    shapes[f"{p}.convShortcut.weight"] = (c_out, c_in, 1, 1)
        shapes |= {**bn("bn1", channels[3]), "fc.weight": (classes, channels[3]), "fc.bias": (classes,)}
    else:
        c_in = 3
        for i, widths in enumerate(VGGS[name]):
            for j, width in enumerate(widths):
                shapes |= {f"block{i}.{3 * j}.weight": (width, c_in, 3, 3), f"block{i}.{3 * j}.bias": (width,),
                           **bn(f"block{i}.{3 * j + 1}", width)}
                c_in = width
        shapes |= {"classifier.weight": (classes, 512), "classifier.bias": (classes,)}
    return shapes


def parameter_count(name: str, classes: int) -> int:
    """Trainable parameters of RepDistiller's `name`: its state dict without BN's running statistics."""
    return sum(torch.Size(shape).numel() for key, shape in repdistiller_shapes(name, classes).items()
               if key.rsplit(".", 1)[1] not in BN_BUFFERS)


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, Tensor]:
    """Values that keep activations tame through a deep net: conv/linear weights scaled by 1/sqrt(fan-in), BN
    statistics near (0, 1) and positive variances."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=gen)
        elif len(shape) > 1:
            state[key] = torch.randn(shape, generator=gen) / torch.Size(shape[1:]).numel() ** 0.5
        elif key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=gen)
    return state


def _bn(x: Tensor, s: dict[str, Tensor], p: str) -> Tensor:
    return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"])


def reference_logits(name: str, s: dict[str, Tensor], x: Tensor) -> Tensor:
    """RepDistiller's eval-mode forward pass of `name`, from the state dict `s` by key names."""
    if name in RESNETS:
        depth = RESNETS[name][0]
        x = F.relu(_bn(F.conv2d(x, s["conv1.weight"], padding=1), s, "bn1"))
        for layer in (1, 2, 3):
            for block in range((depth - 2) // 6):
                p, stride = f"layer{layer}.{block}", 2 if layer > 1 and block == 0 else 1
                out = F.relu(_bn(F.conv2d(x, s[f"{p}.conv1.weight"], stride=stride, padding=1), s, f"{p}.bn1"))
                out = _bn(F.conv2d(out, s[f"{p}.conv2.weight"], padding=1), s, f"{p}.bn2")
                if f"{p}.downsample.0.weight" in s:
                    x = _bn(F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=stride), s, f"{p}.downsample.1")
                x = F.relu(out + x)
        return F.linear(x.mean(dim=(2, 3)), s["fc.weight"], s["fc.bias"])
    if name in WRNS:
        depth = WRNS[name][0]
        x = F.conv2d(x, s["conv1.weight"], padding=1)
        for group in (1, 2, 3):
            for block in range((depth - 4) // 6):
                p, stride = f"block{group}.layer.{block}", 2 if group > 1 and block == 0 else 1
                pre = F.relu(_bn(x, s, f"{p}.bn1"))
                out = F.relu(_bn(F.conv2d(pre, s[f"{p}.conv1.weight"], stride=stride, padding=1), s, f"{p}.bn2"))
                out = F.conv2d(out, s[f"{p}.conv2.weight"], padding=1)
                shortcut = f"{p}.convShortcut.weight"
                x = (F.conv2d(pre, s[shortcut], stride=stride) if shortcut in s else x) + out
        x = F.relu(_bn(x, s, "bn1"))
        return F.linear(x.mean(dim=(2, 3)), s["fc.weight"], s["fc.bias"])
    side = x.shape[-1]
    for i, widths in enumerate(VGGS[name]):
        if 0 < i < 4 or (i == 4 and side == 64):
            x = F.max_pool2d(x, 2)
        for j in range(len(widths)):
            p = f"block{i}.{3 * j}"
            x = F.relu(_bn(F.conv2d(x, s[f"{p}.weight"], s[f"{p}.bias"], padding=1), s, f"block{i}.{3 * j + 1}"))
    return F.linear(x.mean(dim=(2, 3)), s["classifier.weight"], s["classifier.bias"])


def dih_resnet18_shapes(classes: int, blocks: tuple[int, ...] = (2, 2, 2, 2)) -> dict[str, tuple[int, ...]]:
    """The DIH authors' ResNet-18/34 (models_repo/massive_resnets.py): `conv1`, `bn1`, `layerL.B` blocks with
    `shortcut.0/1` projections, `linear`."""
    shapes = {"conv1.weight": (64, 3, 3, 3), **bn("bn1", 64)}
    shapes |= basic_blocks(64, [64, 128, 256, 512], list(blocks), "shortcut")
    return shapes | {"linear.weight": (classes, 512), "linear.bias": (classes,)}


def without_buffers_named(state: dict[str, Tensor], pattern: str) -> dict[str, Tensor]:
    """`state` less the entries whose name matches `pattern` (a file written before a buffer existed)."""
    return {k: v for k, v in state.items() if not re.search(pattern, k)}
