"""Stage 1: train a teacher (or any model of the zoo) with cross-entropy; or, with --tofd, TOFD's teacher; or,
with --import, take a teacher trained elsewhere (RepDistiller, mdistiller, the DIH authors' code).

    python3 train_teacher.py --model res110 --dataset cifar100 --epochs 200 --gpu_id 0
    python3 train_teacher.py --model res110 --tofd --dataset cifar100   # for test_dih.py --method tofd
    python3 train_teacher.py --model res110 --import save/models/resnet110_vanilla/ckpt_epoch_240.pth
"""

from __future__ import annotations

import torch

import assembly
import cli
import distributed
from engine import fit
from heads import tofd_aux_for
from importing import import_teacher
from methods.tofd import VARIANT, TOFDTeacher
from models import MODEL_NAMES
from runlock import run_folder
from stages import TeacherTraining
from utils import UserError, parse_schedule


def main(argv: list[str] | None = None) -> dict:
    parser = cli.common_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", "--teacher", dest="model", default="res110", help=f"one of {', '.join(MODEL_NAMES)}")
    # None rather than False when absent: plain runs stored before this flag existed still --resume.
    parser.add_argument("--tofd", action="store_true", default=None,
                        help="train TOFD's teacher: with auxiliary classifiers on every tap but the last, on the sum "
                             "of all classifiers' cross-entropy (default folder teacher-NAME-tofd-seedS)")
    parser.add_argument("--summary", action="store_true", help="print a torchsummary of the model first")
    parser.add_argument("--import", dest="import_path", default=None, metavar="PATH",
                        help="write the run folder from weights trained elsewhere instead of training: a RepDistiller/"
                             "mdistiller checkpoint ({'model': state_dict, 'epoch', 'accuracy', ...}) or a plain "
                             "state dict (the DIH authors' code); its test accuracy is measured on --dataset")
    args, device, cfg = cli.parse(parser, argv)
    out_dir = cli.run_dir(args, f"teacher-{args.model}" + (f"-{VARIANT}" if args.tofd else ""))
    if args.import_path is not None:
        refuse_training_flags(parser, args)
        if args.world_size > 1:
            raise distributed.same_on_every_rank(UserError("--import runs in one process: start it without torchrun "
                                                           "or srun"))
        with run_folder(out_dir):  # an import writes a run folder too: one writer at a time
            summary = import_teacher(args.model, args.import_path, args, device, cfg, out_dir)
        stated = summary["imported_accuracy"]
        print(f"imported {args.model} from {args.import_path} (epoch {summary['imported_epoch']}, accuracy "
              f"{'not stated' if stated is None else f'{stated:.2f}%'} by the file): test accuracy here "
              f"{summary['final_test_acc']:.2f}% -> {out_dir / summary['checkpoint']}")
        return summary

    with run_folder(out_dir):  # one writer per run folder, from before its data is loaded to its end
        cfg = assembly.keep_layout(cfg, out_dir, args.resume)
        data = cli.load_data(args, device)
        torch.manual_seed(args.seed)
        model = assembly.build(args.model, data.num_classes, device, cfg.channels_last, data.image_size)
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


# What only training reads: given with --import, they would silently do nothing.
TRAINING_FLAGS = ("epochs", "batch_size", "lr", "momentum", "wd", "nesterov", "schedule", "gamma", "pad_mode", "tofd")


def refuse_training_flags(parser: cli.Parser, args) -> None:
    for flag in TRAINING_FLAGS:
        default = parser.get_default(flag)
        if flag == "schedule":
            default = parse_schedule(default)
        if getattr(args, flag) != default:
            raise UserError(f"--{flag} makes no sense with --import: an imported teacher is not trained here")


if __name__ == "__main__":
    cli.main_guard(main)
