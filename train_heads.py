"""Stage 2: train DIH's intermediate classifier heads on a frozen teacher.

    python3 train_heads.py --teacher res110 --dataset cifar100 --epochs 200 --gpu_id 0
"""

from __future__ import annotations

import torch

import assembly
import cli
from checkpoint import model_fingerprint
from engine import fit
from heads import heads_for
from models import MODEL_NAMES
from runlock import run_folder
from stages import HeadsTraining


def main(argv: list[str] | None = None) -> dict:
    parser = cli.common_parser(__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="res110", help=f"one of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--teacher_ckpt", default=None, help="its weights (default: stage 1's default output)")
    args, device, cfg = cli.parse(parser, argv)
    teacher_ckpt = assembly.read_teacher(args, args.teacher)  # before any data is loaded
    out_dir = cli.run_dir(args, f"heads-{args.teacher}")

    with run_folder(out_dir):  # one writer per run folder, from before its data is loaded to its end
        cfg = assembly.keep_layout(cfg, out_dir, args.resume)
        data = cli.load_data(args, device)
        # Unfolded: the stage evaluates it as it is and folds its own copy for the training steps.
        teacher, teacher_identity = assembly.build_teacher(teacher_ckpt, args.teacher, data, device, cfg, fold=False)
        torch.manual_seed(args.seed)
        heads = heads_for(teacher, data.num_classes, data.image_size).to(device)
        taps = ", ".join(heads.tap_names)
        print(f"stage 2: {len(heads.heads)} heads on {args.teacher} at {taps} on {device} -> {out_dir}")
        stage = HeadsTraining(teacher, heads, teacher_identity, teacher_ckpt["path"])
        summary = fit(stage, data, cfg, out_dir, cli.stored_args(args), resume=args.resume)
        if model_fingerprint(teacher) != teacher_identity["fingerprint"]:
            raise RuntimeError("the frozen teacher's weights changed during stage 2")  # a bug, never a user error
    accs = ", ".join(f"{h['tap']} {h['final_test_acc']:.2f}%" for h in summary["heads"])
    print(f"heads: {accs}; teacher's own classifier {summary['final_classifier_test_acc']:.2f}%")
    return summary


if __name__ == "__main__":
    cli.main_guard(main)
