"""Small shared pieces: the user-error type, device choice, atomic writes, fingerprints, schedules (the device's
execution policy is execution.py)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch


class UserError(Exception):
    """A problem with what the user asked for. The CLI prints its one-line message and exits 2."""


class WriteError(UserError):
    """A file could not be written (a full disk, a file-size limit, a read-only or vanished folder): the message
    names the file and the OS error; `atomic_open` left whatever was there before untouched."""

    def __init__(self, path: Path, err: OSError):
        super().__init__(f"cannot write {path} ({err.strerror or err})")
        self.path = path


# What torch.manual_seed and torch.Generator.manual_seed accept: a 64-bit seed, signed or unsigned.
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_seed(seed: int, flag: str = "--seed") -> int:
    """`seed`, if torch can seed its generators with it."""
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise UserError(f"{flag} {seed} is out of range: torch takes seeds from {low} to {high}")
    return seed


def check_writable_dir(folder: Path, flag: str) -> None:
    """Create `folder` if need be and write (then remove) a file in it: an unusable folder is refused up front
    rather than after the work whose results it should hold."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder: choose another {flag}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"probe")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        reason = err.strerror or err
        raise UserError(f"{flag} {folder} cannot be written ({reason}): choose a writable {flag}") from None


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: a GPU's free memory, the host's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resolve_device(gpu_id: str | None) -> torch.device:
    """`None` → the first GPU if there is one, else the CPU; `0` or `cuda:1` → that GPU; `cpu` → the CPU."""
    if gpu_id is None or gpu_id == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    text = gpu_id.strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"(?:cuda:)?(\d+)", text)
    if match is None:
        raise UserError(f"--gpu_id {gpu_id!r} is not understood: use a GPU index like 0, a name like cuda:1, or cpu")
    index = int(match.group(1))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        seen = f"only {count} GPU(s) are visible" if count else "no GPU is visible"
        raise UserError(f"--gpu_id {gpu_id} names GPU {index}, but {seen}; use --gpu_id cpu or a smaller index")
    return torch.device(f"cuda:{index}")


def parse_schedule(tokens: list[str]) -> list[int]:
    """Read LR milestones from `60 120 180`, `60,120,180` or the shell-split `[60, 120, 180]`."""
    text = " ".join(tokens).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    parts = [p for p in re.split(r"[,\s]+", text) if p]
    try:
        milestones = [int(p) for p in parts]
    except ValueError:
        example = "e.g. --schedule 60 120 180"
        raise UserError(f"--schedule {' '.join(tokens)!r} is not a list of epochs, {example}") from None
    if any(m < 1 for m in milestones) or milestones != sorted(milestones):
        raise UserError(f"--schedule {milestones} must be increasing positive epochs")
    return milestones


def lr_at(epoch: int, base_lr: float, milestones: list[int], gamma: float) -> float:
    """Multi-step schedule: epochs are 1-based, and the LR drops by `gamma` from each milestone epoch on."""
    return base_lr * gamma ** sum(epoch > m for m in milestones)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` only once fully written: written under a temporary name beside it,
    flushed to disk, then renamed into place; removed if anything fails. No reader ever sees half a file.
    An OS error (a full disk, a file-size limit) is a `WriteError` naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise WriteError(path, err) from None
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes files private; results and data are meant to be shared
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteError(path, err) from None
        raise


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write, then rename: a killed run never leaves a half-written checkpoint behind."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write(Path(path), buffer.getvalue())


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (an OSError is the caller's to explain)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A SHA-256 of names, shapes, dtypes and values: identifies one set of weights exactly."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
