"""Batch norms folded into the convolutions before them, for networks that only ever run frozen.

In eval mode a BatchNorm2d is a fixed per-channel affine map, y = (x − μ)·γ/√(σ² + ε) + β. When its input is
the output of a convolution and nothing else reads that output, the map can be moved into the convolution's
weights and bias (`torch.nn.utils.fusion.fuse_conv_bn_weights`), and the BN becomes the identity: one memory
pass less per BN, and the same numbers up to float rounding. A frozen teacher runs its forward pass once per
batch of every student step; in a ResNet block (conv, BN, ReLU, conv, BN, add, ReLU) two of its seven kernels go.

Which pairs are legal is read from the network's actual dataflow (a `torch.fx` trace), not from its class:
a BN folds only where its input is a convolution's output that nothing else reads. What that leaves:

- WRN's pre-activation blocks (BN → ReLU → conv): each block's first BN reads the sum of the previous block,
  not a convolution, and so does the final BN before the pooling (the very first block's BN reads the stem's
  convolution and folds where the block's shortcut is a projection, i.e. reads the normalised input);
  the BN after each block's first convolution folds.
- Every BN of the CIFAR ResNets, ResNet-18/34/50 (projection shortcuts, 1x1 conv + BN, included), VGG
  (conv-BN-ReLU), MobileNetV2 (inverted residuals: conv-BN throughout), the ShuffleNets (their channel shuffle and
  split written so that fx traces them) and TOFD's SepConv blocks folds.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

M = TypeVar("M", bound=nn.Module)


class _AllFeatures(nn.Module):
    """A TapModel seen through `forward_features`, so that the trace sees every output a method may read."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple:
        return tuple(self.model.forward_features(x))


def foldable_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) of every BatchNorm2d in `module` that reads a Conv2d's output and nothing else does.

    Traced with `torch.fx` (through `forward_features` where the module has one). A module fx cannot trace (a
    forward that takes a list, a container without a forward) is searched child by child: conservative, since a
    pair split across a child's boundary is then left unfolded.
    """
    root, prefix = (_AllFeatures(module), "model.") if hasattr(module, "forward_features") else (module, "")
    try:
        graph = fx.Tracer().trace(root)
    except (fx.proxy.TraceError, NotImplementedError):
        return [(f"{name}.{conv}", f"{name}.{bn}") for name, child in module.named_children()
                for conv, bn in foldable_pairs(child)]
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(root.get_submodule(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(root.get_submodule(source.target), nn.Conv2d)
                and len(source.users) == 1 and calls[source.target] == calls[node.target] == 1):
            pairs.append((source.target.removeprefix(prefix), node.target.removeprefix(prefix)))
    return pairs


def fold_batchnorm(module: M) -> M:
    """A frozen copy of `module` (eval mode, no gradients) with every foldable BN folded into its convolution.

    The original is untouched, so its weights, fingerprint and checkpoints stay what they were. The BN's affine
    map is folded in float64 and rounded once to the weights' dtype; each folded weight keeps the original's
    memory layout (channels_last or not). The BNs that cannot fold (`foldable_pairs`) stay as they are.
    """
    folded = copy.deepcopy(module).eval().requires_grad_(False)
    for conv_name, bn_name in foldable_pairs(folded):
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        if bn.running_mean is None:  # no running statistics: BN normalises by the batch even in eval mode
            continue
        wide = [None if t is None else t.double() for t in
                (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)]
        weight, bias = fuse_conv_bn_weights(wide[0], wide[1], wide[2], wide[3], bn.eps, wide[4], wide[5])
        fused = copy.deepcopy(conv)
        fused.weight = nn.Parameter(torch.empty_like(conv.weight).copy_(weight), requires_grad=False)
        fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        _replace(folded, conv_name, fused)
        _replace(folded, bn_name, nn.Identity())
    return folded


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def count_batchnorms(module: nn.Module) -> int:
    """How many batch norms `module` holds (after `fold_batchnorm`: those that could not fold)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
