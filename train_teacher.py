"""Stage 1: train a teacher (or any model of the zoo) with cross-entropy; or, with --tofd, TOFD's teacher.

    python3 train_teacher.py --model res110 --dataset cifar100 --epochs 200 --gpu_id 0
    python3 train_teacher.py --model res110 --tofd --dataset cifar100   # for test_dih.py --method tofd
"""

from __future__ import annotations

import torch

import cli
from engine import fit
from heads import tofd_aux_for
from methods.tofd import VARIANT, TOFDTeacher
from models import MODEL_NAMES
from runlock import run_folder
from stages import TeacherTraining


def main(argv: list[str] | None = None) -> dict:
    parser = cli.common_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", "--teacher", dest="model", default="res110", help=f"one of {', '.join(MODEL_NAMES)}")
    # None rather than False when absent: plain runs stored before this flag existed still --resume.
    parser.add_argument("--tofd", action="store_true", default=None,
                        help="train TOFD's teacher: with auxiliary classifiers on every tap but the last, on the sum "
                             "of all classifiers' cross-entropy (default folder teacher-NAME-tofd-seedS)")
    parser.add_argument("--summary", action="store_true", help="print a torchsummary of the model first")
    args, device, cfg = cli.parse(parser, argv)
    out_dir = cli.run_dir(args, f"teacher-{args.model}" + (f"-{VARIANT}" if args.tofd else ""))

    with run_folder(out_dir):  # one writer per run folder, from before its data is loaded to its end
        cfg = cli.keep_layout(cfg, out_dir, args.resume)
        data = cli.load_data(args, device)
        torch.manual_seed(args.seed)
        model = cli.build(args.model, data.num_classes, device, cfg.channels_last, data.image_size)
        if args.summary:
            cli.print_model_summary(model, device, data.image_size)
        if args.tofd:
            aux = tofd_aux_for(model, data.num_classes, data.image_size)
            memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
            stage = TOFDTeacher(model, args.model, aux.to(device, memory_format=memory_format))
        else:
            stage = TeacherTraining(model, args.model)
        print(f"stage 1: {args.model}{' (TOFD)' if args.tofd else ''} on {data.name} ({data.num_classes} classes) on "
              f"{device} -> {out_dir}")
        summary = fit(stage, data, cfg, out_dir, cli.stored_args(args), resume=args.resume)
    for aux_summary in summary.get("aux_classifiers", []):
        print(f"auxiliary classifier on {aux_summary['tap']}: final test accuracy {aux_summary['final_test_acc']:.2f}%")
    print(f"final test accuracy {summary['final_test_acc']:.2f}% (best epoch {summary['best_epoch']}: "
          f"{summary['best_test_acc']:.2f}%) -> {out_dir / summary['checkpoint']}")
    return summary


if __name__ == "__main__":
    cli.main_guard(main)
