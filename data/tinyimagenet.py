"""Tiny-ImageNet (SPEC section 5): 200 classes of 64x64 images, read from the official zip without PIL.

The zip is downloaded into the data folder when absent (or taken from there, or from a mirror given by
--data_url), checked by size and md5, and every JPEG is decoded once, in RGB mode (some are grayscale), into a
uint8 cache beside it that later runs read in seconds (`cache.py`: a stale, truncated or corrupt cache is
rebuilt, never used). Labels are the index of the class's wnid in sorted order, as ImageFolder gives them (the
DIH authors' loader); the 10,000 labelled validation images are the test split, as in every paper.
The images are ImageNet's: non-commercial research and education only. Never commit or ship them.
"""

from __future__ import annotations

import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from tqdm import tqdm

from utils import WriteError

from . import cache
from .base import RGB, DataError, HostData, one_line
from .download import fetch, preparing

ROOT = "tiny-imagenet-200"  # the folder every member of the zip sits in
CACHE_VERSION = 1  # bump when the decoded arrays would differ (order, labels, decoder mode)
_TRAIN_IMAGE = re.compile(rf"{ROOT}/train/([^/]+)/images/[^/]+\.jpe?g", re.IGNORECASE)


@dataclass(frozen=True)
class TinyImageNetSource:
    """Where Tiny-ImageNet comes from and how to check it; the tests point this at a small archive of their own."""

    name: str = "tinyimagenet"
    title: str = "Tiny-ImageNet"
    url: str = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    archive: str = "tiny-imagenet-200.zip"
    archive_md5: str = "90528d7ca1a48142e341f4ef8d21d0de"
    archive_size: int = 248_100_043
    image_size: int = 64
    mean: RGB = (0.4802, 0.4481, 0.3975)  # DIH's own numbers (TOFD/dataloader.py)
    std: RGB = (0.2770, 0.2691, 0.2821)

    def cache_path(self, data_dir: Path) -> Path:
        """Where the decoded arrays are kept: beside the archive."""
        return data_dir / f"{Path(self.archive).stem}.uint8"

    def cache_key(self) -> dict[str, int | str]:
        """What a cache must have been made from to be used: this very archive, decoded this way."""
        return {"version": CACHE_VERSION, "archive_md5": self.archive_md5, "archive_size": self.archive_size,
                "image_size": self.image_size}

    def load(self, data_dir: Path) -> HostData:
        """The cached arrays if the cache is sound, else the archive (fetched if absent) decoded and cached."""
        cached = self._cached(data_dir, report=True)
        if cached is None:
            with preparing(data_dir, self.archive):
                cached = self._cached(data_dir, report=False)  # built meanwhile by another process?
                if cached is None:
                    cached = self._build(data_dir)
        arrays, wnids = cached
        return HostData(self.name, len(wnids), arrays["x_train"], arrays["y_train"], arrays["x_test"],
                        arrays["y_test"], self.mean, self.std)

    def _cached(self, data_dir: Path, report: bool) -> tuple[dict[str, np.ndarray], list[str]] | None:
        """The cache's arrays and wnids; None if there is none or it must be rebuilt (`report`: say why)."""
        path = self.cache_path(data_dir)
        try:
            cached = cache.read(path, self.cache_key())
        except cache.StaleCache as why:
            if report:
                print(f"{path} {why}: rebuilding it")
            return None
        return None if cached is None else (cached[0], cached[1]["wnids"])

    def _build(self, data_dir: Path) -> tuple[dict[str, np.ndarray], list[str]]:
        """Fetch the archive if need be, decode it, and write the cache."""
        archive, path = data_dir / self.archive, self.cache_path(data_dir)
        fetch(self.title, self.url, archive, self.archive_md5, self.archive_size)
        arrays, wnids = _decode_archive(archive, self.image_size)
        try:
            cache.write(path, arrays, self.cache_key(), {"wnids": wnids})
        except WriteError as exc:
            raise DataError(f"{exc}: pass a writable --data_dir") from None
        return arrays, wnids


def _decode_archive(archive: Path, size: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every labelled image of the zip as uint8 NCHW arrays, and the sorted wnids (label i is wnids[i])."""
    try:
        with zipfile.ZipFile(archive) as zf, warnings.catch_warnings():
            # torchvision 0.29 deprecates its codecs for TorchCodec; decode_jpeg is still the one bit-identical
            # to PIL's convert("RGB") (SPEC section 5), and one warning per image would flood the terminal.
            warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
            wnids, train, test = _index(zf, archive)
            print(f"decoding the {len(train) + len(test):,} labelled JPEGs of {archive} once (later runs read the "
                  f"cache)")
            x_train, y_train = _decode(zf, archive, train, size, "train")
            x_test, y_test = _decode(zf, archive, test, size, "val")
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DataError(f"{archive} is corrupt ({one_line(exc)}): delete it to download it again") from exc
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}, wnids


def _text(zf: zipfile.ZipFile, archive: Path, member: str) -> str:
    try:
        return zf.read(member).decode()
    except KeyError:
        raise DataError(f"{archive} has no {member}: not a Tiny-ImageNet archive") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{archive}: {member} is not text ({one_line(exc)})") from exc


def _index(zf: zipfile.ZipFile, archive: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """Sorted wnids; (member, label) of each training image (by class, then name, as ImageFolder lists
    them) and of each validation image (in val_annotations.txt's order)."""
    wnids = _text(zf, archive, f"{ROOT}/wnids.txt").split()
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{archive}: {ROOT}/wnids.txt lists {'no class' if not wnids else 'a class twice'}")
    label = {wnid: i for i, wnid in enumerate(sorted(wnids))}
    members = zf.namelist()
    by_class: dict[str, list[str]] = {wnid: [] for wnid in label}
    for member in members:
        match = _TRAIN_IMAGE.fullmatch(member)
        if match:
            if match[1] not in label:
                raise DataError(f"{archive}: {member} is of a class that {ROOT}/wnids.txt does not list")
            by_class[match[1]].append(member)
    empty = [wnid for wnid, files in by_class.items() if not files]
    if empty:
        raise DataError(f"{archive}: no training images for class {empty[0]} ({len(empty)} classes have none)")
    train = [(member, label[wnid]) for wnid in sorted(label) for member in sorted(by_class[wnid])]

    annotations = f"{ROOT}/val/val_annotations.txt"
    test = []
    for number, line in enumerate(_text(zf, archive, annotations).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label:
            raise DataError(f"{archive}: line {number} of {annotations} is not 'file<TAB>wnid...' with a listed wnid")
        test.append((f"{ROOT}/val/images/{fields[0]}", label[fields[1]]))
    if not test:
        raise DataError(f"{archive}: {annotations} labels no image")
    absent = sorted({member for member, _ in test} - set(members))
    if absent:
        raise DataError(f"{archive}: {absent[0]} is labelled in {annotations} but absent ({len(absent)} missing)")
    return sorted(wnids), train, test


def _decode(zf: zipfile.ZipFile, archive: Path, files: list[tuple[str, int]], size: int,
            split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode `files` in RGB mode (grayscale JPEGs become three equal channels, as PIL's convert("RGB"))."""
    x = np.empty((len(files), 3, size, size), np.uint8)
    for i, (member, _) in enumerate(tqdm(files, desc=f"decoding {split}", leave=False, disable=None)):
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(zf.read(member)), dtype=torch.uint8),
                                mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as exc:
            raise DataError(f"{archive}: {member} is not a readable JPEG ({one_line(exc)})") from exc
        if image.shape != (3, size, size):
            raise DataError(f"{archive}: {member} is {image.shape[2]}x{image.shape[1]} pixels, expected "
                            f"{size}x{size}")
        x[i] = image.numpy()
    return x, np.array([label for _, label in files], np.int64)
