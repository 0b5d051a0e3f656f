"""The interface every source implements, and the error every bad input raises.

A source is anything with `load(data_dir) -> HostData`: it finds, fetches, checks and parses its data and
hands over the whole dataset in host memory as uint8 NCHW images and int64 labels, with its class count,
normalisation constants and the name checkpoints record. Everything after that (the device, augmentation,
batches) is the same for every source and lives in `device.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from utils import UserError

RGB = tuple[float, float, float]


class DataError(UserError, ValueError):
    """Bad data or a bad dataset argument; the message is one line the CLI prints before exiting with 2."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays field by field has no single truth value
class HostData:
    """A whole dataset in host memory, as every source delivers it."""

    name: str  # what checkpoints record: "cifar100", "tinyimagenet", "npz:<stem>:<sha256 prefix>", ...
    num_classes: int
    x_train: np.ndarray  # uint8 (N, 3, S, S), C-contiguous
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    mean: RGB  # per channel, in [0, 1] pixel units
    std: RGB


class Source(Protocol):
    """Where a dataset comes from: `CifarSource`, `TinyImageNetSource`, `SyntheticSource`, `NpzSource`."""

    def load(self, data_dir: Path) -> HostData:
        """The whole dataset, checked; archives are read from (or downloaded into) `data_dir`."""
        ...


def one_line(exc: BaseException) -> str:
    """First line of an exception's text, so that a DataError stays one line."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
