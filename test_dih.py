"""Stage 3: train a student by DIH (the teacher's cohort of classifiers) or by any baseline of the paper.

    python3 test_dih.py --alpha 0.1 --batch_size 64 --dataset cifar100 --epochs 200 --gpu_id 0 \\
        --lr 0.1 --schedule [60, 120, 180] --temperature 5 --wd 0.0005
    python3 test_dih.py --method crd --student res8 --teacher res110 --dataset cifar100
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import cli
from engine import fit
from methods import HYPERS, METHODS, Method, Setup, run_name
from models import MODEL_NAMES
from runlock import run_folder
from utils import UserError

DEFAULT_TEACHER = "res110"


def build_parser() -> cli.Parser:
    parser = cli.common_parser(__doc__.splitlines()[0])
    parser.add_argument("--method", choices=tuple(METHODS), default="dih",
                        help="; ".join(f"{name}: {m.transfers}" for name, m in METHODS.items()))
    parser.add_argument("--student", default="res8", help=f"one of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--teacher", help=f"the trained teacher's architecture (default: {DEFAULT_TEACHER})")
    parser.add_argument("--teacher_ckpt", help="its weights (default: stage 1's default output)")
    parser.add_argument("--heads_ckpt", help="DIH: stage-2 heads (default: stage 2's default output)")
    parser.add_argument("--ta", help="TAKD: the teacher assistant's architecture (default: res20, or res14 "
                                     "for a res20 teacher)")
    parser.add_argument("--ta_ckpt", help="TAKD: its weights (default: the KD student of the teacher in its "
                                          "default folder)")
    group = parser.add_argument_group("hyper-parameters (each method's defaults apply where not given: "
                                      "see README, Methods)")
    for name, hyper in HYPERS.items():
        defaults = ", ".join(f"{m.name} {m.defaults[name]}" for m in METHODS.values() if name in m.defaults)
        text = f"{hyper.help} (default: {defaults or 'set by the method'})"
        if hyper.type is bool:
            group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = cli.finite_float if hyper.type is float else hyper.type
            group.add_argument(f"--{name}", type=kind, default=None, help=text)
    return parser


def resolve(args: argparse.Namespace, method: Method) -> dict[str, Any]:
    """The method's hyper-parameters (given or default), written back into `args` so that they are recorded.

    A flag that the method does not take is refused rather than silently ignored.
    """
    takes = set(method.defaults)
    inputs = {"teacher": method.teacher != "none", "teacher_ckpt": method.teacher != "none",
              "heads_ckpt": method.heads, "ta": method.assistant, "ta_ckpt": method.assistant}
    allowed_inputs = [flag for flag, needed in inputs.items() if needed]
    allowed = takes | set(allowed_inputs)
    for flag in [*HYPERS, *inputs]:
        if getattr(args, flag) is not None and flag not in allowed:
            accepted = ", ".join(f"--{k}" for k in [*allowed_inputs, *method.defaults]) or "none of these flags"
            raise UserError(f"--{flag} makes no sense with --method {method.name} (it takes {accepted})")
    hyper = {}
    for name, default in method.defaults.items():
        value = default if getattr(args, name) is None else getattr(args, name)
        if not HYPERS[name].valid(value):
            raise UserError(f"--{name} must be {HYPERS[name].rule}, got {value}")
        hyper[name] = value
        setattr(args, name, value)
    if method.teacher != "none" and args.teacher is None:
        args.teacher = DEFAULT_TEACHER
    return hyper


def main(argv: list[str] | None = None) -> dict:
    args, device, cfg = cli.parse(build_parser(), argv)
    method = METHODS[args.method]
    hyper = resolve(args, method)
    # Every checkpoint this run needs is found and read before the dataset is loaded (or downloaded).
    teacher_ckpt = heads_ckpt = assistant = None
    if method.teacher != "none":
        teacher_ckpt = cli.read_teacher(args, args.teacher, None if method.teacher == "plain" else method.teacher)
    if method.heads:
        heads_ckpt = cli.read_heads(args)
    if method.assistant:
        from methods.takd import read_assistant

        assistant = read_assistant(args, teacher_ckpt)
        args.ta = assistant["model"]
    out_dir = cli.run_dir(args, run_name(args.student, method.name, args.teacher, hyper, args.ta))
    inputs = {"teacher": teacher_ckpt, "heads": heads_ckpt, "assistant": assistant}
    provenance = {role: {"file": ckpt["path"], "fingerprint": ckpt["fingerprint"]}
                  for role, ckpt in inputs.items() if ckpt is not None}

    with run_folder(out_dir):  # one writer per run folder, from before its data is loaded to its end
        cfg = cli.keep_layout(cfg, out_dir, args.resume)
        data = cli.load_data(args, device)
        meta: dict[str, Any] = {"model": args.student, "method": method.name, "teacher": args.teacher,
                                "alpha": 0.0 if method.teacher == "none" else None, "temperature": None, **hyper}
        teacher = heads = None
        if assistant is not None:  # TAKD: the assistant teaches (read_assistant checked it descends from the teacher)
            teacher, ta_identity = cli.build_teacher(assistant, args.ta, data, device, cfg)
            meta |= {"teacher_fingerprint": teacher_ckpt["fingerprint"], "ta": args.ta,
                     "ta_fingerprint": ta_identity["fingerprint"], "ta_ckpt": assistant["path"]}
        elif teacher_ckpt is not None:
            teacher, identity = cli.build_teacher(teacher_ckpt, args.teacher, data, device, cfg)
            meta["teacher_fingerprint"] = identity["fingerprint"]
            if heads_ckpt is not None:
                heads = cli.build_heads(heads_ckpt, identity, device)
                meta["heads_fingerprint"] = heads_ckpt["fingerprint"]
        torch.manual_seed(args.seed)
        student = cli.build(args.student, data.num_classes, device, cfg.channels_last, data.image_size)
        setup = Setup(student=student, teacher=teacher, hyper=hyper, data=data, meta=meta, heads=heads,
                      teacher_ckpt=teacher_ckpt, provenance=provenance, batch_size=cfg.batch_size)
        stage = method.build(setup)
        stage.extras.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
        print(f"stage 3: {args.student} by {method.name}" + (f" from {args.teacher}" if args.teacher else "")
              + f" on {device} -> {out_dir}")
        summary = fit(stage, data, cfg, out_dir, cli.stored_args(args), resume=args.resume)
    print(f"{method.name} student {args.student}: final test accuracy {summary['final_test_acc']:.2f}% "
          f"(best epoch {summary['best_epoch']}: {summary['best_test_acc']:.2f}%)")
    return summary


if __name__ == "__main__":
    cli.main_guard(main)
