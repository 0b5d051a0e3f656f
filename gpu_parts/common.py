"""What every part uses: its context, child processes with their logs, the synthetic data, the verdict rule."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Context:
    """What a part's process knows: the device, its scratch folder, and whether this is the CPU dry run."""

    gpu_id: str
    work: Path
    dry: bool

    @property
    def gpu(self) -> bool:
        return not self.dry


def log_path(work: Path, name: str) -> Path:
    return work / f"{name}.log"


def launch(argv: list[str], work: Path, name: str, threads: int = 0, extra_env: dict[str, str] | None = None
           ) -> subprocess.Popen:
    """A project script in a child process (of this part's process group), its output into `<name>.log`."""
    env = {**os.environ, **(extra_env or {}), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log_path(work, name), "w") as log:
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def log_tail(work: Path, name: str, lines: int = 3) -> str:
    text = log_path(work, name).read_text(errors="replace") if log_path(work, name).exists() else ""
    return " / ".join(text.strip().splitlines()[-lines:])


def tiny_npz(ctx: Context, train: int, test: int) -> str:
    """A slice of the built-in synthetic set as an npz, written once per part."""
    from data import make_synthetic, save_npz

    path = ctx.work / f"synthetic-{train}.npz"
    if not path.exists():
        save_npz(path, *make_synthetic(train, test, seed=0))
    return str(path)


def judged(ctx: Context, verdict: dict[str, Any]) -> dict[str, Any]:
    """A verdict row as the report gets it: on the GPU as it is; in the CPU dry run shown but not judged (its tiny
    runs measure the machinery, not the GPU), so its `ok` is left out."""
    if ctx.gpu:
        return verdict
    shown = {key: value for key, value in verdict.items() if key != "ok"}
    return shown | {"note": f"CPU dry run, not judged (would be {'ok' if verdict['ok'] else 'not ok'}): "
                            f"{verdict.get('note', '')}"}
