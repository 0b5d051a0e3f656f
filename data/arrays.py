"""A dataset from in-memory arrays laid out as a user's npz holds them: uint8 (N, S, S, 3) images, labels.

The npz file, the synthetic set and `data.from_arrays` all end here: every problem with the arrays gets
its own one-line message, and the normalisation statistics are measured on the training images.
"""

from __future__ import annotations

import math

import numpy as np

from .base import DataError, HostData

MIN_IMAGE_SIZE = 16  # at 8, ResNet-18's last stage would see 1x1 maps (VGG-11 needs 32: checked per model)


def check(where: str, arrays: dict[str, np.ndarray], num_classes: int | None = None) -> int:
    """Validate x_train, y_train, x_test, y_test; return the number of classes (from the labels if not given).

    `where` starts every message: the npz's path, or the caller's name for arrays held in memory.
    """
    sizes = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8:
            raise DataError(f"{where}: x_{split} has dtype {x.dtype}, expected uint8 (pixel values 0..255)")
        if x.ndim != 4 or x.shape[3] != 3 or x.shape[1] != x.shape[2] or x.shape[1] < MIN_IMAGE_SIZE:
            raise DataError(
                f"{where}: x_{split} has shape {x.shape}, expected (N, S, S, 3): square RGB images, "
                f"S >= {MIN_IMAGE_SIZE}"
            )
        if len(x) == 0:
            raise DataError(f"{where}: x_{split} is empty")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{where}: y_{split} has dtype {y.dtype}, expected integer class labels")
        if y.ndim != 1:
            raise DataError(f"{where}: y_{split} has shape {y.shape}, expected (N,)")
        if len(y) != len(x):
            raise DataError(f"{where}: y_{split} has {len(y)} labels but x_{split} has {len(x)} images")
        if y.min() < 0:
            raise DataError(f"{where}: y_{split} has negative labels (min {y.min()}); labels must be 0..K-1")
        sizes.append(x.shape[1])
    if sizes[0] != sizes[1]:
        raise DataError(f"{where}: x_train holds {sizes[0]}x{sizes[0]} images but x_test {sizes[1]}x{sizes[1]}")
    y_train, y_test = arrays["y_train"], arrays["y_test"]
    if num_classes is not None:
        if max(y_train.max(), y_test.max()) >= num_classes:
            raise DataError(f"{where}: labels reach {max(y_train.max(), y_test.max())}, but there are "
                            f"{num_classes} classes")
        return num_classes
    unseen = np.setdiff1d(y_test, y_train)
    if len(unseen):
        raise DataError(
            f"{where}: y_test has classes absent from y_train ({', '.join(map(str, unseen[:5]))}"
            f"{', ...' if len(unseen) > 5 else ''})"
        )
    num_classes = int(y_train.max()) + 1
    if num_classes < 2:
        raise DataError(f"{where}: y_train has a single class; a classifier needs at least 2")
    if num_classes > len(y_train):
        raise DataError(
            f"{where}: y_train's largest label is {num_classes - 1} with only {len(y_train)} training images; "
            "labels must be class indices 0..K-1"
        )
    return num_classes


def channel_stats(x_nhwc: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std in [0, 1] units from 256-bin histograms: no float copy of the data."""
    values = np.arange(256) / 255.0
    mean, std = [], []
    for c in range(3):
        hist = np.bincount(x_nhwc[..., c].ravel(), minlength=256) / x_nhwc[..., c].size
        m = float(hist @ values)
        mean.append(m)
        # A constant channel would divide by zero; one grey level keeps normalisation finite.
        std.append(max(math.sqrt(float(hist @ (values - m) ** 2)), 1 / 255))
    return tuple(mean), tuple(std)


def host_data(
    name: str,
    where: str,
    arrays: dict[str, np.ndarray],
    num_classes: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> HostData:
    """Check NHWC arrays and turn them into a source's `HostData` (NCHW copies: the inputs may be shared)."""
    num_classes = check(where, arrays, num_classes)
    if mean is None or std is None:
        measured = channel_stats(arrays["x_train"])
        mean, std = mean or measured[0], std or measured[1]
    x_train, x_test = (np.array(arrays[k].transpose(0, 3, 1, 2), order="C") for k in ("x_train", "x_test"))
    return HostData(name, num_classes, x_train, arrays["y_train"], x_test, arrays["y_test"], mean, std)
