"""Other codebases' state dicts, described here from their model definitions (never from ours), for the tests.

`repdistiller_shapes(name, classes)` lists every entry of the state dict of RepDistiller's (and mdistiller's:
the same files) model `name` — resnet*, resnet*x4, wrn_*, vgg8/vgg13 with batch norm, and the models of its
cross-architecture table, ResNet50, MobileNetV2 (mobile_half), ShuffleV1, ShuffleV2 — with its shape, as
RepDistiller's models/resnet.py, wrn.py, vgg.py, resnetv2.py, mobilenetv2.py, ShuffleNetv1.py and ShuffleNetv2.py
build them: `conv1`/`bn1` stems, `layerL.B` blocks with `downsample.0/1` projections (ResNet50's Bottlenecks:
`conv1-3`, `bn1-3`, `shortcut.0/1`), `blockG.layer.B` WRN blocks with `convShortcut`, `blockI.J` VGG layers with
conv biases (J counts conv, BN, ReLU), MobileNetV2's `conv1.0/1` stem, `blocks.G.B.conv.0-7` inverted residuals and
`conv2.0/1`, the ShuffleNets' `layerL.B.convK/bnK` blocks (V2: `conv1-5` in each stage's first block) and V2's final
`conv2`/`bn2`; `fc`, `classifier`, `classifier.0` or `linear`. The DIH authors' CIFAR ResNets
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
# mobile_half = mobilenetv2_T_w(T=6, W=0.5): its interverted_residual_setting (t, c, n, s) at width 1.
MOBILENET_SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                     (6, 320, 1, 1)]
SHUFFLE_V1 = {"out_planes": [240, 480, 960], "num_blocks": [4, 8, 4], "groups": 3}
SHUFFLE_V2 = {"out_channels": [116, 232, 464, 1024], "num_blocks": [3, 7, 3]}  # configs[1]
RESNET50_BLOCKS = [3, 4, 6, 3]
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


def mobile_half_shapes(classes: int) -> dict[str, tuple[int, ...]]:
    """MobileNetV2(T=6, width_mult=0.5): `conv1` (conv_bn, stride 2), `blocks.G.B.conv` (0 pw, 3 dw, 6 pw-linear
    convs; 1, 4, 7 their BNs), `conv2` (conv_1x1_bn to 1280), `classifier.0`."""
    c_in = int(32 * 0.5)
    shapes = {"conv1.0.weight": (c_in, 3, 3, 3), **bn("conv1.1", c_in)}
    for g, (t, c, n, _) in enumerate(MOBILENET_SETTING):
        out = int(c * 0.5)
        for b in range(n):
            p, hidden = f"blocks.{g}.{b}.conv", c_in * t
            shapes |= {f"{p}.0.weight": (hidden, c_in, 1, 1), **bn(f"{p}.1", hidden),
                       f"{p}.3.weight": (hidden, 1, 3, 3), **bn(f"{p}.4", hidden),
                       f"{p}.6.weight": (out, hidden, 1, 1), **bn(f"{p}.7", out)}
            c_in = out
    return shapes | {"conv2.0.weight": (1280, c_in, 1, 1), **bn("conv2.1", 1280),
                     "classifier.0.weight": (classes, 1280), "classifier.0.bias": (classes,)}


def shuffle_v1_shapes(classes: int) -> dict[str, tuple[int, ...]]:
    """ShuffleV1: `conv1`/`bn1` (1x1 to 24), `layerL.B` Bottlenecks (conv1 grouped but where it reads 24 channels,
    conv2 depthwise, conv3 grouped; a stage's first block makes out_planes minus its input's width), `linear`."""
    shapes = {"conv1.weight": (24, 3, 1, 1), **bn("bn1", 24)}
    in_planes, groups = 24, SHUFFLE_V1["groups"]
    for layer, (width, count) in enumerate(zip(SHUFFLE_V1["out_planes"], SHUFFLE_V1["num_blocks"], strict=True), 1):
        for block in range(count):
            p = f"layer{layer}.{block}"
            out = width - in_planes if block == 0 else width
            mid, g = int(out / 4), 1 if in_planes == 24 else groups
            shapes |= {f"{p}.conv1.weight": (mid, in_planes // g, 1, 1), **bn(f"{p}.bn1", mid),
                       f"{p}.conv2.weight": (mid, 1, 3, 3), **bn(f"{p}.bn2", mid),
                       f"{p}.conv3.weight": (out, mid // groups, 1, 1), **bn(f"{p}.bn3", out)}
            in_planes = width
    return shapes | {"linear.weight": (classes, in_planes), "linear.bias": (classes,)}


def shuffle_v2_shapes(classes: int) -> dict[str, tuple[int, ...]]:
    """ShuffleV2 (net size 1): `conv1`/`bn1`, `layerL.0` DownBlocks (conv1-5), `layerL.1..` BasicBlocks (conv1-3 on
    half the channels), `conv2`/`bn2` (1x1 to 1024), `linear`."""
    shapes = {"conv1.weight": (24, 3, 1, 1), **bn("bn1", 24)}
    c_in, widths = 24, SHUFFLE_V2["out_channels"]
    for layer, (width, count) in enumerate(zip(widths[:3], SHUFFLE_V2["num_blocks"], strict=True), 1):
        p, mid = f"layer{layer}.0", width // 2
        shapes |= {f"{p}.conv1.weight": (c_in, 1, 3, 3), **bn(f"{p}.bn1", c_in),
                   f"{p}.conv2.weight": (mid, c_in, 1, 1), **bn(f"{p}.bn2", mid),
                   f"{p}.conv3.weight": (mid, c_in, 1, 1), **bn(f"{p}.bn3", mid),
                   f"{p}.conv4.weight": (mid, 1, 3, 3), **bn(f"{p}.bn4", mid),
                   f"{p}.conv5.weight": (mid, mid, 1, 1), **bn(f"{p}.bn5", mid)}
        for block in range(1, count + 1):
            p, half = f"layer{layer}.{block}", int(width * 0.5)
            shapes |= {f"{p}.conv1.weight": (half, half, 1, 1), **bn(f"{p}.bn1", half),
                       f"{p}.conv2.weight": (half, 1, 3, 3), **bn(f"{p}.bn2", half),
                       f"{p}.conv3.weight": (half, half, 1, 1), **bn(f"{p}.bn3", half)}
        c_in = width
    return shapes | {"conv2.weight": (widths[3], c_in, 1, 1), **bn("bn2", widths[3]),
                     "linear.weight": (classes, widths[3]), "linear.bias": (classes,)}


def resnet50_shapes(classes: int) -> dict[str, tuple[int, ...]]:
    """resnetv2.ResNet50: `conv1`/`bn1` (3x3 to 64), `layerL.B` Bottlenecks (conv1-3, bn1-3, `shortcut.0/1` where
    the shape changes), `linear` (2048 inputs)."""
    shapes = {"conv1.weight": (64, 3, 3, 3), **bn("bn1", 64)}
    in_planes = 64
    for layer, (planes, count) in enumerate(zip([64, 128, 256, 512], RESNET50_BLOCKS, strict=True), 1):
        for block in range(count):
            p, stride, out = f"layer{layer}.{block}", 2 if layer > 1 and block == 0 else 1, 4 * planes
            shapes |= {f"{p}.conv1.weight": (planes, in_planes, 1, 1), **bn(f"{p}.bn1", planes),
                       f"{p}.conv2.weight": (planes, planes, 3, 3), **bn(f"{p}.bn2", planes),
                       f"{p}.conv3.weight": (out, planes, 1, 1), **bn(f"{p}.bn3", out)}
            if stride != 1 or in_planes != out:
                shapes |= {f"{p}.shortcut.0.weight": (out, in_planes, 1, 1), **bn(f"{p}.shortcut.1", out)}
            in_planes = out
    return shapes | {"linear.weight": (classes, in_planes), "linear.bias": (classes,)}


CROSS_ARCHITECTURE = {"ResNet50": resnet50_shapes, "MobileNetV2": mobile_half_shapes, "ShuffleV1": shuffle_v1_shapes,
                      "ShuffleV2": shuffle_v2_shapes}


def repdistiller_shapes(name: str, classes: int) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of RepDistiller's model `name` and its shape, in its own order."""
    if name in CROSS_ARCHITECTURE:
        return CROSS_ARCHITECTURE[name](classes)
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


def _conv_bn(x: Tensor, s: dict[str, Tensor], conv: str, norm: str, stride: int = 1, groups: int = 1) -> Tensor:
    """A bias-free conv of the key `conv` (padding: half its kernel) and the BN of the prefix `norm`."""
    weight = s[conv]
    return _bn(F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2, groups=groups), s, norm)


def _shuffle(x: Tensor, groups: int) -> Tensor:
    """RepDistiller's ShuffleBlock: [N,C,H,W] -> [N,g,C/g,H,W] -> [N,C/g,g,H,W] -> [N,C,H,W]."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def _cross_architecture_logits(name: str, s: dict[str, Tensor], x: Tensor) -> Tensor:
    """RepDistiller's eval-mode forward of ResNet50, MobileNetV2, ShuffleV1 or ShuffleV2 (32x32 inputs: their final
    pools are fixed-size there), from the state dict `s` by key names."""
    if name == "MobileNetV2":
        x = F.relu(_conv_bn(x, s, "conv1.0.weight", "conv1.1", stride=2))
        for g, (_, _, n, stride) in enumerate(MOBILENET_SETTING):
            for b in range(n):
                p = f"blocks.{g}.{b}.conv"
                hidden, step = s[f"{p}.0.weight"].shape[0], stride if b == 0 else 1
                out = F.relu(_conv_bn(x, s, f"{p}.0.weight", f"{p}.1"))
                out = F.relu(_conv_bn(out, s, f"{p}.3.weight", f"{p}.4", stride=step, groups=hidden))
                out = _conv_bn(out, s, f"{p}.6.weight", f"{p}.7")
                x = x + out if step == 1 and x.shape[1] == out.shape[1] else out
        x = F.relu(_conv_bn(x, s, "conv2.0.weight", "conv2.1"))
        x = F.avg_pool2d(x, 32 // 16, ceil_mode=True).flatten(1)
        return F.linear(x, s["classifier.0.weight"], s["classifier.0.bias"])
    x = F.relu(_conv_bn(x, s, "conv1.weight", "bn1"))
    layers = {"ResNet50": 4, "ShuffleV1": 3, "ShuffleV2": 3}[name]
    for layer in range(1, layers + 1):
        block = 0
        while f"layer{layer}.{block}.conv1.weight" in s:
            p, first = f"layer{layer}.{block}", block == 0
            if name == "ResNet50":
                stride = 2 if layer > 1 and first else 1
                out = F.relu(_conv_bn(x, s, f"{p}.conv1.weight", f"{p}.bn1"))
                out = F.relu(_conv_bn(out, s, f"{p}.conv2.weight", f"{p}.bn2", stride=stride))
                out = _conv_bn(out, s, f"{p}.conv3.weight", f"{p}.bn3")
                if f"{p}.shortcut.0.weight" in s:
                    x = _conv_bn(x, s, f"{p}.shortcut.0.weight", f"{p}.shortcut.1", stride=stride)
                x = F.relu(out + x)
            elif name == "ShuffleV1":
                g = 1 if x.shape[1] == 24 else SHUFFLE_V1["groups"]
                mid = s[f"{p}.conv1.weight"].shape[0]
                out = _shuffle(F.relu(_conv_bn(x, s, f"{p}.conv1.weight", f"{p}.bn1", groups=g)), g)
                out = F.relu(_conv_bn(out, s, f"{p}.conv2.weight", f"{p}.bn2", stride=2 if first else 1, groups=mid))
                out = _conv_bn(out, s, f"{p}.conv3.weight", f"{p}.bn3", groups=SHUFFLE_V1["groups"])
                x = F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1) if first else out + x)
            elif first:  # ShuffleV2's DownBlock
                c_in = x.shape[1]
                left = _conv_bn(x, s, f"{p}.conv1.weight", f"{p}.bn1", stride=2, groups=c_in)
                left = F.relu(_conv_bn(left, s, f"{p}.conv2.weight", f"{p}.bn2"))
                right = F.relu(_conv_bn(x, s, f"{p}.conv3.weight", f"{p}.bn3"))
                right = _conv_bn(right, s, f"{p}.conv4.weight", f"{p}.bn4", stride=2, groups=right.shape[1])
                right = F.relu(_conv_bn(right, s, f"{p}.conv5.weight", f"{p}.bn5"))
                x = _shuffle(torch.cat([left, right], 1), 2)
            else:  # ShuffleV2's BasicBlock: SplitBlock(0.5)
                c = int(x.shape[1] * 0.5)
                kept, out = x[:, :c], x[:, c:]
                out = F.relu(_conv_bn(out, s, f"{p}.conv1.weight", f"{p}.bn1"))
                out = _conv_bn(out, s, f"{p}.conv2.weight", f"{p}.bn2", groups=c)
                out = F.relu(_conv_bn(out, s, f"{p}.conv3.weight", f"{p}.bn3"))
                x = _shuffle(torch.cat([kept, out], 1), 2)
            block += 1
    if name == "ShuffleV2":
        x = F.relu(_conv_bn(x, s, "conv2.weight", "bn2"))
    x = F.adaptive_avg_pool2d(x, 1) if name == "ResNet50" else F.avg_pool2d(x, 4)
    return F.linear(x.flatten(1), s["linear.weight"], s["linear.bias"])


def reference_logits(name: str, s: dict[str, Tensor], x: Tensor) -> Tensor:
    """RepDistiller's eval-mode forward pass of `name`, from the state dict `s` by key names."""
    if name in CROSS_ARCHITECTURE:
        return _cross_architecture_logits(name, s, x)
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
