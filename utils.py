"""Small shared pieces: the user-error type, device choice, atomic writes, fingerprints, schedules."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch


class UserError(Exception):
    """A problem with what the user asked for. The CLI prints its one-line message and exits 2."""


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


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes files private; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write, then rename: a killed run never leaves a half-written checkpoint behind."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write(Path(path), buffer.getvalue())


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A SHA-256 of names, shapes, dtypes and values: identifies one set of weights exactly."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
