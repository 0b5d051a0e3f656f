"""The environment part: torch, CUDA and the GPU; then torchvision (a broken one fails this part, not the check)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from .common import Context


def environment(ctx: Context) -> Iterator[dict[str, Any]]:
    row: dict[str, Any] = {"device": "cpu", "python": sys.version.split()[0], "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cpu_cores": os.cpu_count()}
    if ctx.gpu:
        device = torch.device(f"cuda:{ctx.gpu_id.removeprefix('cuda:')}")
        p = torch.cuda.get_device_properties(device)
        row |= {"device": p.name, "index": device.index, "gpus_visible": torch.cuda.device_count(),
                "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                "bf16": torch.cuda.is_bf16_supported(including_emulation=False),
                "cudnn": torch.backends.cudnn.version()}
    yield row
    import torchvision

    yield {"torchvision": torchvision.__version__}

