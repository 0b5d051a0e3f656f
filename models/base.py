"""The interface every backbone implements: logits plus the feature maps at its taps."""

import torch
from torch import Tensor, nn


class TapModel(nn.Module):
    """A classifier that also exposes intermediate feature maps ("taps").

    DIH mounts one linear head per tap (Table 1 of the paper's README). Subclasses name their taps in
    depth order in `tap_names` and return the matching feature maps from `forward_taps`, computed in
    the same pass as the logits so that a frozen teacher runs once per batch.
    """

    tap_names: tuple[str, ...] = ()

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return (logits, [feature map at each tap, in `tap_names` order])."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # Collecting the taps only keeps references to maps the pass computes anyway, so one code path
        # serves both (torch.compile drops the unused outputs).
        return self.forward_taps(x)[0]

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
                _, taps = self.forward_taps(x)
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
