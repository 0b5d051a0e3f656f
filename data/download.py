"""Fetching a dataset's archive: download under a temporary name, check size and md5, then rename.

Shared by CIFAR and Tiny-ImageNet. An archive already in the data folder is checked rather than
re-downloaded; a download that fails its checks is deleted, so no bad archive is ever left to be trusted.
Whatever is fetched, extracted or decoded into the data folder is made under `preparing`'s lock, so that
concurrent first runs (a sweep's first level) do it once and all use the one checked result.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from torchvision.datasets.utils import check_integrity, download_url

import runlock

from .base import DataError, one_line


@contextlib.contextmanager
def preparing(data_dir: Path, archive: str) -> Iterator[None]:
    """Be the one process fetching, extracting or decoding `archive` in `data_dir`; the others wait their turn,
    then find the work done (callers look again once inside)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data directory {data_dir} ({one_line(exc)}): pass another "
                        "--data_dir") from exc

    def waiting(holder: str) -> None:
        print(f"waiting for {holder} to prepare {archive} in {data_dir}", flush=True)

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(runlock.hold(data_dir / f".{archive}.lock", wait=waiting))
        except runlock.Unwritable as bad:
            raise DataError(f"cannot write in the data directory {data_dir} ({bad.reason}): pass a writable "
                            "--data_dir, or place the dataset there") from None
        yield


def _size_problem(path: Path, size: int | None) -> str:
    """Why `path` cannot be the archive of `size` bytes, or "" when its size is right (or not known)."""
    have = path.stat().st_size
    return f"has {have:,} bytes, expected {size:,}" if size is not None and have != size else ""


def fetch(title: str, url: str, archive: Path, md5: str, size: int | None = None) -> None:
    """Make sure `archive` is the right file: check the one there, or download it from `url` first.

    `url` may be http(s), file:// or a plain local path (a mirror on a shared disk).
    """
    if archive.exists():
        problem = _size_problem(archive, size) or ("" if check_integrity(archive, md5) else "fails its md5 check")
        if problem:
            raise DataError(f"{archive} {problem} (expected md5 {md5}): delete it to download it again")
        return
    root = archive.parent  # exists: `preparing` made it
    tmp = root / f"{archive.name}.{os.getpid()}.part"  # download_url skips files that already exist
    try:
        try:
            if urllib.parse.urlparse(url).scheme in ("", "file"):  # torchvision's downloader needs a Content-Length
                shutil.copyfile(urllib.request.url2pathname(urllib.parse.urlparse(url).path), tmp)
            else:
                download_url(url, str(root), filename=tmp.name)
        except (urllib.error.URLError, OSError, ValueError, RuntimeError) as exc:
            raise DataError(
                f"could not download {title} from {url} to {root} ({one_line(exc)}; no network?): "
                f"place {archive.name} there, pass --data_dir, or a mirror with --data_url"
            ) from exc
        problem = _size_problem(tmp, size) or ("" if check_integrity(tmp, md5) else "fails its md5 check")
        if problem:
            raise DataError(
                f"the {title} archive downloaded from {url} {problem} (expected md5 {md5}): "
                f"retry, or place a good {archive.name} in {root}"
            )
        os.replace(tmp, archive)
    finally:
        tmp.unlink(missing_ok=True)
