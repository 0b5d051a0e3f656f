"""Datasets: where they come from, and how they are held and augmented on the training device.

    sources (each `load(data_dir) -> HostData`, the interface in base.py)
      cifar.py          CIFAR-10/100 from the official python archives
      tinyimagenet.py   Tiny-ImageNet from the official zip, decoded once into a cache (cache.py)
      synthetic.py      the built-in procedurally generated 10-class set (offline demos and tests)
      npz.py            a user's own arrays; arrays.py checks them (and `from_arrays`' arguments)
      download.py       fetching an archive: temporary name, size and md5 checks, rename
    device.py           DeviceDataset (uint8 on the device), the batched crop/flip gather, train/test batches

`load_dataset` maps a --dataset value to its source and moves what it loads to the device.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import torch

from . import arrays
from .base import DataError, HostData, Source
from .cifar import CIFAR_SOURCES, CifarSource
from .device import (
    DEFAULT_PAD_MODE,
    PAD,
    PAD_MODES,
    Batch,
    DeviceDataset,
    Shard,
    crop_flip,
    num_train_batches,
    test_batches,
    to_device,
    train_batches,
)
from .npz import NpzSource, npz_name, save_npz
from .synthetic import SyntheticSource, make_synthetic
from .tinyimagenet import TinyImageNetSource

__all__ = [
    "BUILTIN", "CIFAR_SOURCES", "DEFAULT_PAD_MODE", "DOWNLOADED_NAMES", "PAD", "PAD_MODES", "SOURCES", "TINYIMAGENET",
    "Batch", "CifarSource", "DataError", "DeviceDataset", "HostData", "NpzSource", "Shard", "Source", "SyntheticSource",
    "TinyImageNetSource", "crop_flip", "dataset_tag", "from_arrays", "load_dataset", "make_synthetic", "npz_name",
    "num_train_batches", "save_npz", "source_for", "test_batches", "train_batches",
]

TINYIMAGENET = TinyImageNetSource()
SOURCES: dict[str, Source] = {**CIFAR_SOURCES, "tinyimagenet": TINYIMAGENET, "synthetic": SyntheticSource()}
BUILTIN = tuple(SOURCES)
DOWNLOADED = (CifarSource, TinyImageNetSource)  # the sources a --data_url can point at
DOWNLOADED_NAMES = tuple(name for name, source in SOURCES.items() if isinstance(source, DOWNLOADED))


def dataset_tag(spec: str) -> str:
    """Short filesystem-safe tag naming a dataset in default output folders."""
    if spec in BUILTIN:
        return spec
    if spec.lower().endswith(".npz"):
        return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).stem) or "npz"
    raise DataError(f"unknown dataset {spec!r}: choose {', '.join(BUILTIN)} or a path to a .npz file")


def source_for(spec: str) -> Source:
    """The source behind a --dataset value: a built-in name or a path to a .npz file."""
    dataset_tag(spec)  # rejects unknown names with the standard message
    return SOURCES[spec] if spec in SOURCES else NpzSource(Path(spec).expanduser())


def load_dataset(
    spec: str, data_dir: str | Path, device: torch.device, *, url: str | None = None, source: Source | None = None
) -> DeviceDataset:
    """Load ``spec`` (a name of `BUILTIN` or a .npz path) onto ``device``.

    Archives are read from, or downloaded into, ``data_dir``; ``url`` is a mirror of the archive
    (--data_url); ``source`` replaces the built-in description (tests use it to serve small archives).
    """
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
