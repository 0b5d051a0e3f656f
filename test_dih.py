"""Stage 3: train a student by DIH (the teacher's cohort of classifiers) or by any baseline of the paper.

    python3 test_dih.py --alpha 0.1 --batch_size 64 --dataset cifar100 --epochs 200 --gpu_id 0 \\
        --lr 0.1 --schedule [60, 120, 180] --temperature 5 --wd 0.0005
    python3 test_dih.py --method crd --student res8 --teacher res110 --dataset cifar100
    python3 test_dih.py --method kd at crd mhkd dih --student res8 --teacher res110 --kd.alpha 0.5

Several methods train side by side in one process (students.py, engine.fit_group): each batch is drawn and augmented
once, and each teacher runs once per batch for all the students it teaches. Every student still gets the folder, the
files and, on the CPU, the very numbers that its own run (`--method` with that method alone) would give.
"""

from __future__ import annotations

from typing import Any

import cli
import students


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Train the students of --method; return their summaries by method."""
    parser = cli.common_parser(__doc__.splitlines()[0])
    students.add_flags(parser)
    args, device, cfg = cli.parse(parser, argv)
    summaries = students.train(args, device, cfg)
    for method, summary in summaries.items():
        print(f"{method} student {summary['model']}: final test accuracy {summary['final_test_acc']:.2f}% "
              f"(best epoch {summary['best_epoch']}: {summary['best_test_acc']:.2f}%)")
    return summaries


if __name__ == "__main__":
    cli.main_guard(main)
