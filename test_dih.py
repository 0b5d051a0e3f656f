"""Stage 3: train a student taught by the teacher's cohort of classifiers (DIH), or by KD / CE baselines.

    python3 test_dih.py --alpha 0.1 --batch_size 64 --dataset cifar100 --epochs 200 --gpu_id 0 \\
        --lr 0.1 --schedule [60, 120, 180] --temperature 5 --wd 0.0005
"""

from __future__ import annotations

import torch

import cli
from engine import fit
from models import MODEL_NAMES
from stages import Distillation, Supervised
from utils import UserError


def main(argv: list[str] | None = None) -> dict:
    parser = cli.common_parser(__doc__.splitlines()[0])
    parser.add_argument("--student", default="res8", help=f"one of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--teacher", default="res110", help="the stage-1 teacher (ignored by --method ce)")
    parser.add_argument("--teacher_ckpt", default=None, help="stage-1 weights (default: stage 1's default output)")
    parser.add_argument("--heads_ckpt", default=None, help="stage-2 heads (default: stage 2's default output)")
    parser.add_argument("--method", choices=("dih", "kd", "ce"), default="dih",
                        help="dih: teacher + heads teach; kd: teacher's final classifier only; ce: no teacher")
    parser.add_argument("--alpha", type=float, default=0.1, help="weight of the distillation term")
    parser.add_argument("--temperature", type=float, default=5.0)
    parser.add_argument("--cohort_reduction", choices=("sum", "mean"), default="sum",
                        help="sum the loss over the cohort (the paper's code) or average it")
    args, device, cfg = cli.parse(parser, argv)
    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha must lie in [0, 1], got {args.alpha}")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    name = f"student-{args.student}-ce" if args.method == "ce" else (
        f"student-{args.student}-{args.method}-{args.teacher}-a{args.alpha:g}-t{args.temperature:g}")
    out_dir = cli.run_dir(args, name)

    data = cli.load_data(args, device)
    if args.method != "ce":
        teacher, teacher_identity = cli.load_teacher(args, data, device, cfg)
        heads = cli.load_heads(args, teacher_identity, device) if args.method == "dih" else None
    torch.manual_seed(args.seed)
    student = cli.build(args.student, data.num_classes, device, cfg.channels_last)
    if args.method == "ce":
        extra = {"method": "ce", "teacher": None, "alpha": 0.0, "temperature": None}
        stage = Supervised(student, args.student, kind="student", extra=extra)
    else:
        extra = {"model": args.student, "method": args.method, "teacher": args.teacher, "alpha": args.alpha,
                 "temperature": args.temperature, "cohort_reduction": args.cohort_reduction,
                 "teacher_fingerprint": teacher_identity["fingerprint"]}
        stage = Distillation(student, teacher, heads, args.alpha, args.temperature, args.cohort_reduction, extra)
    print(f"stage 3: {args.student} by {args.method} on {device} -> {out_dir}")
    summary = fit(stage, data, cfg, out_dir, cli.stored_args(args), resume=args.resume)
    print(f"{args.method} student {args.student}: final test accuracy {summary['final_test_acc']:.2f}% "
          f"(best epoch {summary['best_epoch']}: {summary['best_test_acc']:.2f}%)")
    return summary


if __name__ == "__main__":
    cli.main_guard(main)
