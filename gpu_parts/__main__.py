"""A part's own process, as the runner starts it: `python3 -m gpu_parts NAME --gpu_id ID --work DIR [--dry]`;
its rows go to stdout, one `@row {json}` line each, as they come."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gpu_check import ROW

from .accuracy import accuracy
from .common import Context
from .concurrency import concurrency
from .cuda_tests import cuda_tests
from .environment import environment
from .smoke import smoke
from .stage_speed import bench_dih, bench_teacher

PARTS: dict[str, Callable[[Context], Iterator[dict[str, Any]]]] = {
    "environment": environment, "smoke": smoke, "bench_dih": bench_dih, "bench_teacher": bench_teacher,
    "concurrency": concurrency, "accuracy": accuracy, "cuda_tests": cuda_tests,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m gpu_parts", description=__doc__.splitlines()[0])
    p.add_argument("part", choices=tuple(PARTS))
    p.add_argument("--gpu_id", required=True)
    p.add_argument("--work", type=Path, required=True, help="the part's scratch folder")
    p.add_argument("--dry", action="store_true", help="the CPU dry run")
    args = p.parse_args(argv)
    for row in PARTS[args.part](Context(args.gpu_id, args.work, args.dry)):
        print(ROW + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
