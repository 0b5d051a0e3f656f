"""Stage 1: train a teacher (or any model of the zoo) with cross-entropy.

    python3 train_teacher.py --model res110 --dataset cifar100 --epochs 200 --gpu_id 0
"""

from __future__ import annotations

import torch

import cli
from engine import fit
from models import MODEL_NAMES
from stages import TeacherTraining


def main(argv: list[str] | None = None) -> dict:
    parser = cli.common_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", "--teacher", dest="model", default="res110", help=f"one of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--summary", action="store_true", help="print a torchsummary of the model first")
    args, device, cfg = cli.parse(parser, argv)
    out_dir = cli.run_dir(args, f"teacher-{args.model}")

    data = cli.load_data(args, device)
    torch.manual_seed(args.seed)
    model = cli.build(args.model, data.num_classes, device, cfg.channels_last, data.image_size)
    if args.summary:
        cli.print_model_summary(model, device, data.image_size)
    print(f"stage 1: {args.model} on {data.name} ({data.num_classes} classes) on {device} -> {out_dir}")
    summary = fit(TeacherTraining(model, args.model), data, cfg, out_dir, cli.stored_args(args), resume=args.resume)
    print(f"final test accuracy {summary['final_test_acc']:.2f}% (best epoch {summary['best_epoch']}: "
          f"{summary['best_test_acc']:.2f}%) -> {out_dir / summary['checkpoint']}")
    return summary


if __name__ == "__main__":
    cli.main_guard(main)
