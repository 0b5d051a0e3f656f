"""A folder of images (`--dataset PATH`) and ILSVRC-2012 (`--dataset imagenet --data_dir PATH`), scanned and checked.

The layout is the one torchvision's ImageFolder and every KD repository read:

    PATH/train/<class>/<image>      PATH/val/<class>/<image>

Class indices follow the sorted names of train/'s class folders. Everything that would make the dataset silently
smaller or its labels wrong is refused in one line naming the file or folder: an empty file, a file that is no
JPEG, PNG, GIF or WebP by its first bytes, an empty class folder, a class in val/ that train/ lacks. Hidden
entries (a name starting with '.') are skipped. A file whose header is right but whose data is broken is found
when it is decoded, and named then (streaming.py). The images stay on disk; streaming.py reads them each epoch.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .base import DataError, one_line

# torchvision's ImageNet normalisation, used for every folder (the pretrained teachers expect it).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CLASSES = 1000
DEFAULT_IMAGE_SIZE = 224
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")  # JPEG, PNG, GIF; WebP below


@dataclass(frozen=True, eq=False)
class FolderIndex:
    """The files of both splits with their labels, as the scan found and checked them."""

    name: str  # what checkpoints record: `folder:<name>:<hash>` or `imagenet:<hash>`; the hash covers names and sizes
    classes: tuple[str, ...]
    train_files: tuple[str, ...]
    train_labels: tuple[int, ...]
    val_files: tuple[str, ...]
    val_labels: tuple[int, ...]


def _is_image(head: bytes) -> bool:
    return head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _visible(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"{folder} could not be read ({one_line(exc)})") from exc


def _class_files(folder: Path, digest: hashlib._Hash) -> list[str]:
    """The checked image files of one class folder, sorted by name."""
    files = []
    for entry in _visible(folder):
        if entry.is_dir():
            continue
        path = Path(entry.path)
        try:
            size = entry.stat().st_size
            with open(path, "rb") as f:
                head = f.read(12)
        except OSError as exc:
            raise DataError(f"{path} could not be read ({one_line(exc)})") from exc
        if size == 0:
            raise DataError(f"{path} is an empty file")
        if not _is_image(head):
            raise DataError(f"{path} is not a JPEG, PNG, GIF or WebP image (by its first bytes)")
        digest.update(f"{folder.name}/{entry.name}:{size}\n".encode())
        files.append(str(path))
    if not files:
        raise DataError(f"{folder} is an empty class folder (no image files)")
    return files


def scan(root: Path) -> tuple[tuple[str, ...], list[str], list[int], list[str], list[int], str]:
    """Classes, train files and labels, val files and labels of `root`, and a hash of their names and sizes."""
    train, val = root / "train", root / "val"
    for split in (train, val):
        if not split.is_dir():
            raise DataError(f"{root} has no {split.name}/ folder: expected {root}/train/<class>/* and "
                            f"{root}/val/<class>/*")
    classes = tuple(e.name for e in _visible(train) if e.is_dir())
    if not classes:
        raise DataError(f"{train} holds no class folders")
    index = {name: i for i, name in enumerate(classes)}
    digest = hashlib.sha256()
    found: dict[str, tuple[list[str], list[int]]] = {}
    for split in (train, val):
        files: list[str] = []
        labels: list[int] = []
        for entry in _visible(split):
            if not entry.is_dir():
                continue
            if entry.name not in index:
                raise DataError(f"{split / entry.name}: class {entry.name!r} is not in {train}")
            class_files = _class_files(split / entry.name, digest)
            files += class_files
            labels += [index[entry.name]] * len(class_files)
        if not files:
            raise DataError(f"{split} holds no class folders")
        found[split.name] = files, labels
    return classes, *found["train"], *found["val"], digest.hexdigest()


def index_folder(root: Path, imagenet: bool = False) -> FolderIndex:
    """Scan `root` (see the module docstring); `imagenet` also checks ILSVRC-2012's 1000 classes."""
    root = root.expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder" + (" (--data_dir of --dataset imagenet)" if imagenet else ""))
    classes, train_files, train_labels, val_files, val_labels, digest = scan(root)
    if imagenet and len(classes) != IMAGENET_CLASSES:
        raise DataError(f"{root / 'train'} holds {len(classes)} class folders; ILSVRC-2012 has {IMAGENET_CLASSES} "
                        "(see the README's 'Image folders and ImageNet')")
    name = f"imagenet:{digest[:12]}" if imagenet else f"folder:{_tag(root)}:{digest[:12]}"
    return FolderIndex(name, classes, tuple(train_files), tuple(train_labels), tuple(val_files), tuple(val_labels))


def _tag(root: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", root.resolve().name) or "folder"


def folder_tag(root: str | Path) -> str:
    """Short filesystem-safe tag naming an image folder in default output folders."""
    return _tag(Path(root).expanduser())
