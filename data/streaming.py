"""The streaming data path: images read from disk each epoch, for datasets that do not fit on the device.

Worker processes (a torch DataLoader) read each file's bytes, decode them with torchvision.io (JPEG, PNG, GIF,
WebP; grayscale, CMYK and alpha all to RGB) and crop them: torchvision's standard ImageNet transforms, with the
same parameters, on uint8 tensors. Training: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bilinear with
antialiasing) to S x S and a horizontal flip with probability 1/2; evaluation: the shorter side resized to
round(S * 256 / 224), the centre S x S. The batches travel as uint8 (a quarter of float32's bytes) and are
normalised on the device, one batch in flight ahead of the one being trained on (and, with workers, up to
`PREFETCH` batches per worker decoded ahead).

Random streams: each epoch draws its permutation and one 62-bit seed from the run's data generator when it
starts (as the device path draws its permutation, offsets and flips), and image `i`'s crop and flip come from a
generator seeded with (that seed, i). So the crops do not depend on the number of workers or on which worker
decodes which batch, and restoring the data generator's state (--resume) replays an epoch exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .base import RGB, DataError
from .device import ALONE, Batch, Shard, shard_bounds
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD, FolderIndex

CROP_SCALE = (0.08, 1.0)  # torchvision.transforms.RandomResizedCrop's defaults
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RESIZE_PER_CROP = 256 / 224  # evaluation: Resize(256), CenterCrop(224), scaled with the image size
PREFETCH = 2  # batches each worker decodes ahead (in shared memory: /dev/shm must hold workers x 2 batches)
DECODERS = ("workers", "nvjpeg")
JPEG_SIGNATURE = b"\xff\xd8\xff"


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field has no single truth value
class StreamingDataset:
    """A dataset whose images stay on disk: file lists, labels on the device, and the decoding settings."""

    name: str
    num_classes: int
    image_size: int
    train_files: tuple[str, ...]
    y_train: Tensor  # int64 labels on the training device (what CRD's sampler and the accuracy read)
    test_files: tuple[str, ...]
    y_test: Tensor
    mean: RGB
    std: RGB
    workers: int  # decoding processes; 0 decodes in the training process
    decode: str = "workers"  # or "nvjpeg": the workers only read, JPEGs are decoded on the GPU in batches

    @property
    def device(self) -> torch.device:
        return self.y_train.device


def streaming_dataset(index: FolderIndex, device: torch.device, image_size: int, workers: int,
                      decode: str = "workers") -> StreamingDataset:
    """The scanned folder as a StreamingDataset on `device`."""
    if decode not in DECODERS:
        raise DataError(f"unknown decoder {decode!r}: choose {' or '.join(DECODERS)}")
    if decode == "nvjpeg" and device.type != "cuda":
        raise DataError(f"--decode nvjpeg decodes on a CUDA GPU; this run is on {device}")
    if image_size < 8:
        raise DataError(f"--image_size must be at least 8 pixels, got {image_size}")
    if workers < 0:
        raise DataError(f"--workers must be 0 or more, got {workers}")
    return StreamingDataset(
        name=index.name, num_classes=len(index.classes), image_size=image_size,
        train_files=index.train_files, y_train=torch.tensor(index.train_labels, dtype=torch.int64, device=device),
        test_files=index.val_files, y_test=torch.tensor(index.val_labels, dtype=torch.int64, device=device),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=workers, decode=decode,
    )


def decode_rgb(data: bytes, path: str) -> Tensor:
    """A file's bytes as an RGB uint8 image (3, H, W); anything undecodable is a DataError naming the file."""
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0].rpartition(", ")[2] if str(exc).strip() else "corrupt"
        raise DataError(f"{path} could not be decoded as an image ({reason})") from None
    if image.ndim == 4:  # an animated GIF: its first frame, as PIL opens it
        image = image[0]
    return image if image.dtype == torch.uint8 else TF.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs


def crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop: torchvision's algorithm (10 tries, then a centre crop of the
    clamped ratio), drawn from `rng` instead of torch's global generator."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_view(image: Tensor, size: int, rng: np.random.Generator) -> Tensor:
    """RandomResizedCrop(size) and RandomHorizontalFlip of a uint8 image, drawn from `rng`."""
    top, left, h, w = crop_box(image.shape[-2], image.shape[-1], rng)
    crop = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    return crop.flip(-1) if rng.random() < 0.5 else crop


def eval_view(image: Tensor, size: int) -> Tensor:
    """Resize(round(size * 256 / 224)) and CenterCrop(size) of a uint8 image."""
    return TF.center_crop(TF.resize(image, [round(size * RESIZE_PER_CROP)], antialias=True), [size, size])


class _Decoder(torch.utils.data.Dataset):
    """Decodes and crops whole batches (`__getitems__`) in a DataLoader worker; returns (uint8 batch, error).

    An error comes back as its one-line text instead of an exception, so that the training process raises it
    as a DataError (a worker's exception would arrive wrapped in a traceback).
    """

    def __init__(self, files: tuple[str, ...], size: int, epoch_seed: int | None):
        self.files, self.size, self.epoch_seed = files, size, epoch_seed  # epoch_seed None: evaluation views

    def __len__(self) -> int:
        return len(self.files)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, str | None]:
        out = torch.empty(len(indices), 3, self.size, self.size, dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            out.share_memory_()  # written once, handed to the training process without a copy
        for slot, i in enumerate(indices):
            path = self.files[i]
            try:
                with open(path, "rb") as f:
                    image = decode_rgb(f.read(), path)
            except OSError as exc:
                return out, f"{path} could not be read ({exc.strerror or exc})"
            except DataError as exc:
                return out, str(exc)
            if self.epoch_seed is None:
                out[slot] = eval_view(image, self.size)
            else:
                out[slot] = train_view(image, self.size, np.random.default_rng((self.epoch_seed, i)))
        return out, None


def _as_is(batch: tuple[Tensor, str | None]) -> tuple[Tensor, str | None]:
    return batch


def _decoded(ds: StreamingDataset, files: tuple[str, ...], batches: list[list[int]], epoch_seed: int | None
             ) -> Iterator[Tensor]:
    """The uint8 batches of `batches` (lists of indices into `files`), decoded by `ds.workers` processes."""
    if ds.decode == "nvjpeg":
        yield from _nvjpeg_decoded(ds, files, batches, epoch_seed)
        return
    loader = DataLoader(_Decoder(files, ds.image_size, epoch_seed), batch_sampler=batches, num_workers=ds.workers,
                        collate_fn=_as_is, pin_memory=ds.device.type == "cuda",
                        prefetch_factor=PREFETCH if ds.workers else None)
    for images, error in loader:
        if error is not None:
            raise DataError(error)
        yield images


# ---- GPU decoding (--decode nvjpeg). UNTESTED ON A GPU: written on a machine without one; `make gpu-check` has
# no case for it yet. The workers only read bytes; the training process decodes each batch's JPEGs in one
# nvjpeg call on the GPU (other formats on the CPU) and crops there, with the same crop draws as the workers.

class _Reader(torch.utils.data.Dataset):
    """Reads whole batches of files as byte tensors in a DataLoader worker; returns (bytes, error)."""

    def __init__(self, files: tuple[str, ...]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitems__(self, indices: list[int]) -> tuple[list[Tensor], str | None]:
        out = []
        for i in indices:
            try:
                with open(self.files[i], "rb") as f:
                    out.append(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))
            except OSError as exc:
                return out, f"{self.files[i]} could not be read ({exc.strerror or exc})"
        return out, None


def _nvjpeg_decoded(ds: StreamingDataset, files: tuple[str, ...], batches: list[list[int]], epoch_seed: int | None
                    ) -> Iterator[Tensor]:
    """As `_decoded`, the JPEGs decoded on the GPU in one batched call (see above: untested on a GPU)."""
    loader = DataLoader(_Reader(files), batch_sampler=batches, num_workers=ds.workers, collate_fn=_as_is,
                        prefetch_factor=PREFETCH if ds.workers else None)
    for indices, (raw, error) in zip(batches, loader, strict=True):
        if error is not None:
            raise DataError(error)
        jpegs = [k for k, data in enumerate(raw) if bytes(data[:3].tolist()) == JPEG_SIGNATURE]
        images: list[Tensor | None] = [None] * len(raw)
        try:
            decoded = decode_jpeg([raw[k] for k in jpegs], mode=ImageReadMode.RGB, device=ds.device)
        except RuntimeError:
            for k in jpegs:  # find and name the file nvjpeg refused
                decode_rgb(raw[k].numpy().tobytes(), files[indices[k]])
            raise
        for k, image in zip(jpegs, decoded, strict=True):
            images[k] = image
        for k in set(range(len(raw))) - set(jpegs):
            images[k] = decode_rgb(raw[k].numpy().tobytes(), files[indices[k]]).to(ds.device)
        yield torch.stack([
            eval_view(image, ds.image_size) if epoch_seed is None
            else train_view(image, ds.image_size, np.random.default_rng((epoch_seed, i)))
            for i, image in zip(indices, images, strict=True)])


def _on_device(ds: StreamingDataset, batches: Iterator[Tensor], channels_last: bool) -> Iterator[Tensor]:
    """Each uint8 batch normalised on the device as float32, the next one's copy started before this one is used."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    scale = [1.0 / (255.0 * s) for s in ds.std]
    shift = [-m / s for m, s in zip(ds.mean, ds.std, strict=True)]

    def normalised(images: Tensor) -> Tensor:
        # In place, channel by channel with scalars: on the CPU 5x faster than one broadcast addcmul (measured).
        x = images.float()
        for c in range(3):
            x[:, c].mul_(scale[c]).add_(shift[c])
        return x

    pending = None
    for images in batches:
        moved = images.to(ds.device, non_blocking=True).contiguous(memory_format=memory_format)
        if pending is not None:
            yield normalised(pending)
        pending = moved
    if pending is not None:
        yield normalised(pending)


def num_train_batches(ds: StreamingDataset, batch_size: int) -> int:
    """Batches per epoch; the last partial batch counts."""
    return math.ceil(len(ds.train_files) / batch_size)


def train_batches(ds: StreamingDataset, batch_size: int, generator: torch.Generator, channels_last: bool = False,
                  shard: Shard = ALONE) -> Iterator[Batch]:
    """One augmented epoch: the permutation and the epoch's crop seed drawn from `generator` as iteration starts.
    With a `shard`, every process draws the same global epoch and decodes only its rows of each global batch (an
    image's crop depends on the epoch's seed and its index alone): the processes together see what one would."""
    order = torch.randperm(len(ds.train_files), generator=generator, device=generator.device)
    epoch_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    order, listed = order.to(ds.device), order.tolist()
    spans = []  # (first row, end row, row within the global batch, rows of the global batch)
    for start in range(0, len(listed), batch_size):
        whole = min(batch_size, len(listed) - start)
        first, stop = shard_bounds(whole, *shard)
        spans.append((start + first, start + stop, first, whole))
    images = _on_device(ds, _decoded(ds, ds.train_files, [listed[a:b] for a, b, _, _ in spans], epoch_seed),
                        channels_last)
    for (a, b, first, whole), x in zip(spans, images, strict=True):
        index = order[a:b]
        yield Batch(x, ds.y_train[index], index, first, None if shard.world == 1 else whole)


def test_batches(ds: StreamingDataset, batch_size: int, channels_last: bool = False, shard: Shard = ALONE
                 ) -> Iterator[tuple[Tensor, Tensor]]:
    """The validation images in order: resized, centre-cropped, normalised; with a `shard`, this process's contiguous
    share of them (the shares together hold every image once)."""
    first, stop = shard_bounds(len(ds.test_files), *shard)
    starts = range(first, stop, batch_size)
    batches = [list(range(start, min(start + batch_size, stop))) for start in starts]
    images = _on_device(ds, _decoded(ds, ds.test_files, batches, None), channels_last)
    for start, x in zip(starts, images, strict=True):
        yield x, ds.y_test[start:min(start + batch_size, stop)]


test_batches.__test__ = False  # not a pytest test, even when a test module imports it by name


def default_workers() -> int:
    """Decoding processes when --workers is not given: one per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
