"""CIFAR-10 and CIFAR-100 from their official python archives: md5-checked, parsed without PIL."""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, extract_archive

from .base import RGB, DataError, HostData, one_line
from .download import fetch, preparing

IMAGE_SIZE = 32


@dataclass(frozen=True)
class CifarSource:
    """Where one CIFAR variant comes from and how to check it; the tests point this at a local archive."""

    name: str
    title: str
    url: str
    archive: str
    archive_md5: str
    folder: str
    train_files: tuple[tuple[str, str], ...]  # (file name, md5)
    test_files: tuple[tuple[str, str], ...]
    label_key: bytes
    num_classes: int
    mean: RGB
    std: RGB

    def load(self, data_dir: Path) -> HostData:
        """Fetch and extract when absent, check every file's md5, parse."""
        folder = data_dir / self.folder
        files = self.train_files + self.test_files
        if not self._extracted(folder):
            with preparing(data_dir, self.archive):
                if not self._extracted(folder):  # else another process has just extracted it
                    self._fetch_and_extract(data_dir)
        for name, md5 in files:
            if not check_integrity(folder / name, md5):
                raise DataError(f"{folder / name} is missing or fails its md5 check: delete {folder} and run again")
        splits = []
        for names in (self.train_files, self.test_files):
            parts = [_read_batch(folder / name, self.label_key) for name, _ in names]
            splits += [np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])]
        labels = np.concatenate([splits[1], splits[3]])
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DataError(f"labels in {folder} are outside 0..{self.num_classes - 1}: delete it and run again")
        return HostData(self.name, self.num_classes, *splits, self.mean, self.std)

    def _extracted(self, folder: Path) -> bool:
        return all((folder / name).is_file() for name, _ in self.train_files + self.test_files)

    def _fetch_and_extract(self, data_dir: Path) -> None:
        """Fetch the archive if need be and extract it beside, then rename the folder into place: a process
        that finds the folder finds it whole."""
        fetch(self.title, self.url, data_dir / self.archive, self.archive_md5)
        scratch = None
        try:
            scratch = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{self.folder}."))
            extract_archive(str(data_dir / self.archive), str(scratch))
            if not (scratch / self.folder).is_dir():
                raise DataError(f"{data_dir / self.archive} holds no {self.folder}/: delete it and run again")
            shutil.rmtree(data_dir / self.folder, ignore_errors=True)  # an incomplete earlier extraction
            os.replace(scratch / self.folder, data_dir / self.folder)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"could not extract {data_dir / self.archive} into {data_dir} ({one_line(exc)}): delete the archive "
                "and run again, or pass another --data_dir"
            ) from exc
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)


def _from_torchvision(cls: type[CIFAR10], name: str, title: str, label_key: bytes, num_classes: int, mean: RGB,
                      std: RGB) -> CifarSource:
    """Read url, archive name and md5s from torchvision's own dataset class rather than retyping them."""
    return CifarSource(
        name=name,
        title=title,
        url=cls.url,
        archive=cls.filename,
        archive_md5=cls.tgz_md5,
        folder=cls.base_folder,
        train_files=tuple((file, md5) for file, md5 in cls.train_list),
        test_files=tuple((file, md5) for file, md5 in cls.test_list),
        label_key=label_key,
        num_classes=num_classes,
        mean=mean,
        std=std,
    )


CIFAR_SOURCES: dict[str, CifarSource] = {
    "cifar10": _from_torchvision(
        CIFAR10, "cifar10", "CIFAR-10", b"labels", 10, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    ),
    "cifar100": _from_torchvision(
        CIFAR100, "cifar100", "CIFAR-100", b"fine_labels", 100, (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
    ),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch needs nothing else to be rebuilt."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch -> uint8 (N, 3, 32, 32) images and int64 labels."""
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except Exception as exc:  # any failure to parse is the same problem for the user: a bad file
        raise DataError(f"could not parse {path} ({one_line(exc)}): delete {path.parent} and run again") from exc
    if data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE or len(labels) != len(data):
        raise DataError(f"unexpected array shapes in {path}: delete {path.parent} and run again")
    return data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE), labels
