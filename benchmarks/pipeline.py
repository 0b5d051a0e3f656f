"""The input pipeline's throughput: the streaming path (data/streaming.py) against the conventional one.

    python3 bench.py pipeline --images 512 --workers 2 --batch_size 64 --repeats 3

Both read the same generated JPEGs (ImageNet's size distribution: about 400x350 pixels and 110 KB a file) and
deliver normalised float32 batches of 224x224 training crops:
- conventional: torchvision.datasets.ImageFolder (PIL decoding) with RandomResizedCrop, RandomHorizontalFlip,
  ToTensor and Normalize in the workers, a DataLoader with `--workers` worker processes;
- streaming: the project's path, torchvision.io decoding and the same crops on uint8 tensors in as many workers,
  uint8 batches normalised in the training process.

Reported per pipeline: images/s (wall clock) and images per CPU-second (user + system time of the training
process and its workers together; a measure of cost per core that other load on the machine does not change),
best of `--repeats` epochs after one warm-up epoch. The 1-minute load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(root: Path, count: int, classes: int = 4, seed: int = 0) -> float:
    """`count` JPEGs in root/train/<class>/ and one per class in root/val/: sizes around 400x350 (300-500 by
    260-440), quality 94, content with detail at every scale so that a file holds about 110 KB. Returns the mean
    file size in KB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for split, n in (("train", count), ("val", classes)):
        for i in range(n):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            width, height = int(rng.integers(300, 501)), int(rng.integers(260, 441))
            image = np.zeros((height, width, 3))
            for cell, weight in ((64, 0.25), (16, 0.15), (4, 0.15), (1, 0.45)):  # coarse shapes to fine texture
                grid = rng.random((height // cell + 2, width // cell + 2, 3))
                layer = Image.fromarray((grid * 255).astype(np.uint8)).resize((width + 2 * cell, height + 2 * cell),
                                                                               Image.BICUBIC)
                image += weight * np.asarray(layer)[cell:cell + height, cell:cell + width]
            path = folder / f"{i:06d}.jpg"
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=94)
            sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def cpu_seconds() -> float:
    """User + system time of this process and of its finished (waited-for) children, the workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def conventional_epoch(root: Path, size: int, batch_size: int, workers: int, seed: int) -> Iterable[torch.Tensor]:
    """torchvision's ImageFolder + PIL transforms + DataLoader: the normalised float batches of one epoch."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(ImageFolder(str(root / "train"), transform), batch_size=batch_size,
                                         shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed))
    return (x for x, _ in loader)


def streaming_epoch(root: Path, size: int, batch_size: int, workers: int, seed: int) -> Iterable[torch.Tensor]:
    """The project's streaming path: the normalised float batches of one epoch."""
    from data import load_dataset, train_batches

    data = load_dataset(str(root), "unused", torch.device("cpu"), image_size=size, workers=workers)
    return (batch.x for batch in train_batches(data, batch_size, torch.Generator().manual_seed(seed)))


PIPELINES: dict[str, Callable[..., Iterable[torch.Tensor]]] = {"conventional": conventional_epoch,
                                                              "streaming": streaming_epoch}


def measure(epoch: Callable[..., Iterable[torch.Tensor]], root: Path, size: int, batch_size: int, workers: int,
            repeats: int) -> tuple[float, float]:
    """(images/s, images per CPU-second), each the best of `repeats` epochs after a warm-up epoch."""
    best_wall = best_cpu = 0.0
    for repeat in range(repeats + 1):
        wall, cpu, images = time.perf_counter(), cpu_seconds(), 0
        for x in epoch(root, size, batch_size, workers, seed=repeat):
            assert x.dtype == torch.float32 and x.shape[-2:] == (size, size)
            images += len(x)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        if repeat:  # the first epoch warms caches and imports
            best_wall, best_cpu = max(best_wall, images / wall), max(best_cpu, images / cpu)
    return best_wall, best_cpu


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(prog="bench.py pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512, help="training JPEGs to generate")
    p.add_argument("--workers", type=int, default=2, help="worker processes of each pipeline")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3, help="measured epochs per pipeline (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--dir", default=None, help="where to generate the JPEGs (default: a temporary folder)")
    args = p.parse_args(argv)
    for name in ("images", "workers", "batch_size", "image_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        root = Path(folder)
        kb = make_jpegs(root, args.images)
        print(f"{args.images} JPEGs, mean {kb:.0f} KB; {args.workers} workers, batch {args.batch_size}, "
              f"{args.image_size} px, {args.threads} training-process thread(s); load average "
              f"{os.getloadavg()[0]:.2f} before")
        results = {}
        for name, epoch in PIPELINES.items():
            wall, cpu = measure(epoch, root, args.image_size, args.batch_size, args.workers, args.repeats)
            results[name] = {"images_per_s": wall, "images_per_cpu_s": cpu}
            print(f"{name:>12}: {wall:7.1f} images/s, {cpu:7.1f} images per CPU-second "
                  f"(load average {os.getloadavg()[0]:.2f})")
    ratio = results["streaming"]["images_per_cpu_s"] / results["conventional"]["images_per_cpu_s"]
    wall_ratio = results["streaming"]["images_per_s"] / results["conventional"]["images_per_s"]
    print(f"streaming / conventional: {ratio:.2f}x per CPU-second, {wall_ratio:.2f}x wall clock")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
