"""A user's own dataset as an ``.npz`` file: arrays x_train, y_train, x_test, y_test (images N x S x S x 3)."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils import atomic_open, file_sha256

from . import arrays
from .base import DataError, HostData, one_line

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def save_npz(
    path: str | Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> None:
    """Write a dataset in the ``--dataset PATH.npz`` format; atomic, so a crash never leaves half a file."""
    with atomic_open(path) as f:
        np.savez_compressed(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


@dataclass(frozen=True)
class NpzSource:
    """``--dataset PATH.npz``; its recorded name carries a hash of the file, so checkpoints know the data."""

    path: Path

    def load(self, data_dir: Path) -> HostData:
        """Read and check the file (`data_dir` is not used: the path says where it is)."""
        path = self.path
        if not path.is_file():
            raise DataError(f"dataset file not found: {path}")
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path} is not an npz (zip) archive; write one with numpy.savez")
        found = {}
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [name for name in NPZ_ARRAYS if name not in npz.files]
                if missing:
                    raise DataError(
                        f"{path} lacks array(s) {', '.join(missing)} (it has: {', '.join(npz.files) or 'none'}); "
                        f"expected {', '.join(NPZ_ARRAYS)}"
                    )
                for name in NPZ_ARRAYS:
                    try:
                        found[name] = npz[name]
                    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                        raise DataError(f"{path}: array {name} could not be read ({one_line(exc)})") from exc
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path} could not be read as an npz archive ({one_line(exc)})") from exc
        return arrays.host_data(npz_name(path), str(path), found)


def npz_name(path: Path) -> str:
    """What runs on the npz at `path` record as their dataset: `npz:<stem>:<sha256 prefix of the file>`, so a
    regenerated file of the same name is another dataset."""
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise DataError(f"{path} could not be read ({one_line(exc)})") from exc
    return f"npz:{path.stem}:{digest[:12]}"
