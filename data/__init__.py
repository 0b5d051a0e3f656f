"""Datasets: where they come from, and how they are held and augmented on the training device.

    sources (each `load(data_dir) -> HostData`, the interface in base.py)
      cifar.py          CIFAR-10/100 from the official python archives
      tinyimagenet.py   Tiny-ImageNet from the official zip, decoded once into a cache (cache.py)
      synthetic.py      the built-in procedurally generated 10-class set (offline demos and tests)
      npz.py            a user's own arrays; arrays.py checks them (and `from_arrays`' arguments)
      download.py       fetching an archive: temporary name, size and md5 checks, rename
    device.py           DeviceDataset (uint8 on the device), the batched crop/flip gather, train/test batches
    imagefolder.py      a folder of images (train/<class>/*, val/<class>/*) or ILSVRC-2012: scanned and checked
    streaming.py        StreamingDataset: images decoded from disk each epoch by worker processes

`load_dataset` maps a --dataset value to its source: a folder of images (or `imagenet`) becomes a
StreamingDataset, everything else a DeviceDataset. `train_batches`, `test_batches` and `num_train_batches` serve
both kinds, so the engine reads either the same way.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from . import arrays, streaming
from . import device as resident
from .base import DataError, HostData, Source
from .cifar import CIFAR_SOURCES, CifarSource
from .device import DEFAULT_PAD_MODE, PAD, PAD_MODES, Batch, DeviceDataset, Shard, crop_flip, to_device
from .imagefolder import DEFAULT_IMAGE_SIZE, folder_tag, index_folder
from .npz import NpzSource, npz_name, save_npz
from .streaming import StreamingDataset, default_workers
from .synthetic import MINI_IMAGE_SIZE, MINI_SIZE, SyntheticSource, make_synthetic
from .tinyimagenet import TinyImageNetSource

__all__ = [
    "BUILTIN", "CIFAR_SOURCES", "DEFAULT_PAD_MODE", "DOWNLOADED_NAMES", "PAD", "PAD_MODES", "SOURCES", "TINYIMAGENET",
    "Batch", "CifarSource", "DataError", "Dataset", "DeviceDataset", "HostData", "IMAGENET", "NpzSource", "Shard",
    "Source", "StreamingDataset", "SyntheticSource", "TinyImageNetSource", "crop_flip", "dataset_tag", "from_arrays",
    "is_streamed", "load_dataset", "make_synthetic", "npz_name",
    "num_train_batches", "save_npz", "source_for", "test_batches", "train_batches",
]

TINYIMAGENET = TinyImageNetSource()
SOURCES: dict[str, Source] = {**CIFAR_SOURCES, "tinyimagenet": TINYIMAGENET, "synthetic": SyntheticSource(),
                              "synthetic-mini": SyntheticSource("synthetic-mini", MINI_SIZE, MINI_IMAGE_SIZE)}
BUILTIN = tuple(SOURCES)
DOWNLOADED = (CifarSource, TinyImageNetSource)  # the sources a --data_url can point at
DOWNLOADED_NAMES = tuple(name for name, source in SOURCES.items() if isinstance(source, DOWNLOADED))
IMAGENET = "imagenet"  # ILSVRC-2012, sorted into class folders under --data_dir (streamed)

Dataset = DeviceDataset | StreamingDataset


def is_streamed(spec: str) -> bool:
    """Whether --dataset `spec` is streamed from disk (a folder of images, imagenet), not held on the device."""
    return _is_folder(spec)


def _is_folder(spec: str) -> bool:
    npz = spec.lower().endswith(".npz")
    return spec == IMAGENET or (spec not in BUILTIN and not npz and Path(spec).expanduser().is_dir())


def dataset_tag(spec: str) -> str:
    """Short filesystem-safe tag naming a dataset in default output folders."""
    if spec in BUILTIN or spec == IMAGENET:
        return spec
    if spec.lower().endswith(".npz"):
        return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).stem) or "npz"
    if _is_folder(spec):
        return folder_tag(spec)
    raise DataError(f"unknown dataset {spec!r}: choose {', '.join(BUILTIN)}, {IMAGENET}, a path to a .npz file or "
                    "a folder of images (train/<class>/*, val/<class>/*)")


def source_for(spec: str) -> Source:
    """The source behind a --dataset value: a built-in name or a path to a .npz file."""
    dataset_tag(spec)  # rejects unknown names with the standard message
    return SOURCES[spec] if spec in SOURCES else NpzSource(Path(spec).expanduser())


def load_dataset(
    spec: str, data_dir: str | Path, device: torch.device, *, url: str | None = None, source: Source | None = None,
    image_size: int | None = None, workers: int | None = None, decode: str | None = None,
) -> Dataset:
    """Load ``spec`` (a name of `BUILTIN` or a .npz path) onto ``device``, or stream a folder of images.

    Archives are read from, or downloaded into, ``data_dir``; ``url`` is a mirror of the archive
    (--data_url); ``source`` replaces the built-in description (tests use it to serve small archives).
    A folder (or `imagenet`: ILSVRC-2012 in ``data_dir``) is scanned and streamed at ``image_size`` pixels
    (default 224), decoded by ``workers`` processes (default: one per usable CPU), or read by them and decoded
    on the GPU (``decode="nvjpeg"``).
    """
    if source is None and _is_folder(spec):
        if url is not None:
            raise DataError(f"--data_url is a mirror of a downloaded archive ({', '.join(DOWNLOADED_NAMES)}); "
                            f"{spec} has none")
        root = Path(data_dir) if spec == IMAGENET else Path(spec)
        index = index_folder(root, imagenet=spec == IMAGENET)
        return streaming.streaming_dataset(index, device, image_size or DEFAULT_IMAGE_SIZE,
                                           default_workers() if workers is None else workers, decode or "workers")
    if image_size is not None:
        raise DataError(f"--image_size applies to folders of images and imagenet; {spec} has its own size")
    for flag, value in (("workers", workers), ("decode", decode)):
        if value is not None:
            raise DataError(f"--{flag} applies to folders of images and imagenet; {spec} is held on the device")
    source = source or source_for(spec)
    if url is not None:
        if not isinstance(source, DOWNLOADED):
            names = ", ".join(DOWNLOADED_NAMES)
            raise DataError(f"--data_url is a mirror of a downloaded archive ({names}); {spec} has none")
        source = dataclasses.replace(source, url=url)
    return to_device(source.load(Path(data_dir).expanduser()), device)


def from_arrays(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    device: torch.device,
    *,
    name: str = "arrays",
    num_classes: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> DeviceDataset:
    """A DeviceDataset from in-memory arrays laid out as an npz holds them (uint8 N x S x S x 3), checked alike.

    The class count defaults to what the labels show, mean and std to the training images' own.
    """
    found = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    return to_device(arrays.host_data(name, name, found, num_classes, mean, std), device)


def num_train_batches(ds: Dataset, batch_size: int) -> int:
    """Batches per epoch of either kind of dataset; the last partial batch counts."""
    if isinstance(ds, StreamingDataset):
        resident.check_batch_size(batch_size)
        return streaming.num_train_batches(ds, batch_size)
    return resident.num_train_batches(ds, batch_size)


def train_batches(ds: Dataset, batch_size: int, generator: torch.Generator, channels_last: bool = False,
                  pad_mode: str = DEFAULT_PAD_MODE, shard: Shard = resident.ALONE) -> Iterator[Batch]:
    """One augmented epoch of either kind of dataset (`pad_mode` is the device path's padded crop's; `shard`: this
    process's share of every global batch)."""
    if isinstance(ds, StreamingDataset):
        resident.check_batch_size(batch_size)
        return streaming.train_batches(ds, batch_size, generator, channels_last, shard)
    return resident.train_batches(ds, batch_size, generator, channels_last, pad_mode, shard)


def test_batches(ds: Dataset, batch_size: int, channels_last: bool = False,
                 shard: Shard = resident.ALONE) -> Iterator[tuple[torch.Tensor, ...]]:
    """The test set in order, normalised, of either kind of dataset (`shard`: this process's contiguous share)."""
    if isinstance(ds, StreamingDataset):
        resident.check_batch_size(batch_size)
        return streaming.test_batches(ds, batch_size, channels_last, shard)
    return resident.test_batches(ds, batch_size, channels_last, shard)


test_batches.__test__ = False  # not a pytest test, even when a test module imports it by name
