"""Checkpoints passed between stages: weights plus the metadata needed to rebuild and check them.

Every file is a plain dict of tensors and primitives, so it loads with `torch.load(weights_only=True)`.
Loading checks the file's kind and identity against what the user asked for, and turns every
problem (missing, truncated, garbage, another architecture, class count or dataset) into one
`UserError` line instead of a traceback or a silently wrong run.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils import UserError, atomic_torch_save, fingerprint

FORMAT = "dih-checkpoint/1"
KINDS = ("teacher", "heads", "student", "extras", "resume")


def save_checkpoint(path: str | Path, kind: str, state_dict: dict[str, torch.Tensor], **meta: Any) -> None:
    """Atomically write `state_dict` (moved to the CPU) with its metadata."""
    assert kind in KINDS, kind
    weights = {name: tensor.detach().cpu() for name, tensor in state_dict.items()}
    atomic_torch_save({"format": FORMAT, "kind": kind, **meta, "state_dict": weights}, path)


def load_checkpoint(path: str | Path, kind: str | tuple[str, ...], flag: str, hint: str = "",
                    mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint of the given kind(s); `flag` names where the path came from, `hint` how to make it.

    `mmap` maps the tensors instead of reading them: for a look at the metadata of a large file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}: no checkpoint at {path}" + (f"; {hint}" if hint else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{flag}: {path} is not a readable checkpoint (truncated or corrupt?): {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "state_dict" not in ckpt:
        raise UserError(f"{flag}: {path} is not a checkpoint written by this project")
    kinds = (kind,) if isinstance(kind, str) else kind
    if ckpt["kind"] not in kinds:
        wanted = " or ".join(kinds)
        raise UserError(f"{flag}: {path} holds {ckpt['kind']} weights, but {wanted} weights are needed here")
    return ckpt


def expect_match(ckpt: dict[str, Any], flag: str, **expected: Any) -> None:
    """Refuse a checkpoint whose metadata differs from what this run needs (architecture, classes, dataset...)."""
    for field, want in expected.items():
        have = ckpt.get(field)
        if have != want:
            raise UserError(
                f"{flag}: the checkpoint was made for {field}={have!r}, but this run needs {field}={want!r}"
            )


def load_weights(module: nn.Module, ckpt: dict[str, Any], flag: str) -> None:
    """Load by name, strictly: a missing, extra or differently shaped tensor is refused, never skipped."""
    state = ckpt["state_dict"]
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        first = (missing or unexpected or wrong_shape)[0]
        raise UserError(
            f"{flag}: weights do not fit the model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong_shape)} of another shape; first: {first})"
        )
    module.load_state_dict(state)


def identity(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What identifies a trained model: architecture, classes, dataset and the exact weights."""
    return {key: ckpt[key] for key in ("model", "num_classes", "dataset", "fingerprint")}


def model_fingerprint(module: nn.Module) -> str:
    return fingerprint(module.state_dict())
