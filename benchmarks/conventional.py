"""The conventional path, the foil: how most KD code trains (a torchvision DataLoader with per-image PIL
transforms, fp32, eager, NCHW, each module called apart under no_grad, `loss.item()` every step)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from engine import TrainConfig

from .harness import ALPHA, MEAN, STD, TEMPERATURE, Models, Step, place

# ----------------------------------------------------------------------------- the conventional path


class PilImages(Dataset):
    """The conventional input pipeline: each item becomes a PIL image and goes through torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool):
        self.images, self.labels = images, labels
        crop_flip = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]  # zeros, as ours
        self.transform = transforms.Compose(
            [*(crop_flip if augment else []), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def conventional_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device) -> DataLoader:
    """A DataLoader as KD code usually builds one: one worker per core, pinned memory on CUDA, shuffled."""
    return DataLoader(
        PilImages(images, labels, augment=True),
        batch_size=batch_size,
        shuffle=True,
        num_workers=os.cpu_count() or 1,
        pin_memory=device.type == "cuda",
        drop_last=False,  # as data.train_batches
    )


def conventional_step(kind: str, models: Models, cfg: TrainConfig, device: torch.device) -> Step:
    """One conventional training step of stage `kind` on a CPU batch; returns the loss as a Python float.

    Only the optimiser's settings are taken from `cfg`: this path is always fp32, NCHW and eager.
    """
    teacher = place(models.teacher, device, channels_last=False)
    heads = list(place(models.heads, device, channels_last=False).heads)
    if kind == "teacher":
        trainable: list[nn.Module] = [teacher.train()]
    else:
        teacher.eval().requires_grad_(False)
        trainable = heads if kind == "heads" else [place(models.student, device, channels_last=False).train()]
        if kind == "dih":
            for head in heads:
                head.eval().requires_grad_(False)
    optimizer = torch.optim.SGD(
        [p for module in trainable for p in module.parameters()],
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd, nesterov=cfg.nesterov,
    )

    def losses(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if kind == "teacher":
            logits = teacher(x)
            return F.cross_entropy(logits, y), logits
        if kind == "heads":
            with torch.no_grad():
                features = teacher.forward_features(x).taps
            outputs = [head(f.flatten(1)) for head, f in zip(heads, features, strict=True)]
            return sum(F.cross_entropy(out, y) for out in outputs), outputs[-1]
        with torch.no_grad():
            final, features, _ = teacher.forward_features(x)
            for _ in range(2):  # the original computed every head's logits twice per step (SPEC section 2)
                head_logits = [head(f.flatten(1)) for head, f in zip(heads, features, strict=True)]
            cohort = [final, *head_logits]
        logits = trainable[0](x)
        loss = torch.zeros((), device=device)
        for member in cohort:
            log_q, p = F.log_softmax(logits / TEMPERATURE, 1), F.softmax(member / TEMPERATURE, 1)
            kl = F.kl_div(log_q, p, reduction="batchmean")
            loss = loss + (1 - ALPHA) * F.cross_entropy(logits, y) + ALPHA * TEMPERATURE**2 * kl
        return loss, logits

    def step(x: Tensor, y: Tensor) -> float:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, logits = losses(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        (logits.argmax(1) == y).sum().item()  # the running accuracy such loops print
        return loss.item()

    return step

