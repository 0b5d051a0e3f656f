"""bench.py's command line: the flags, the engine config the stage scripts would build from them, the run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import torch

import cli
from engine import TrainConfig
from execution import COMPILE_MODES
from methods import METHODS
from models import MODEL_NAMES

# --------------------------------------------------------------------------------------------- main
from sweep.cost import PROJECTED, projection
from sweep.grid import PRESETS

from .harness import STAGES, Plan, device_name
from .measures import ABLATIONS, Workload, ablation, compare, group_costs, growth, method_costs

JSON_KEYS = ("stage", "device", "batch_size", "fast_img_s", "conventional_img_s", "ratio")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(description="Training-step throughput: the project's fast path against a conventional one "
                               "(benchmarks/ says how it is measured)")
    p.add_argument("--gpu_id", default=None, help="0, cuda:1 or cpu (default: the first GPU if any, else the CPU)")
    p.add_argument("--stages", default=",".join(STAGES), help="some of teacher,heads,dih; or none")
    p.add_argument("--teacher", default="res110", choices=MODEL_NAMES, metavar="MODEL", help="a model of the zoo")
    p.add_argument("--student", default="res8", choices=MODEL_NAMES, metavar="MODEL", help="a model of the zoo")
    p.add_argument("--num_classes", type=int, default=100, help="as CIFAR-100")
    p.add_argument("--batch_size", type=int, default=64, help="the paper's")
    p.add_argument("--steps", type=int, default=None, help="steps per timed repeat (default: 20; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5, at least 3 on CUDA; "
                                                             "--quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, the paths taking turns; the median "
                                                              "counts (default: 5; --quick: 3)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast (auto: what the stage scripts choose for the device)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                   help="torch.compile and/or CUDA graphs, as the stage scripts' flag (auto: what they choose)")
    p.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                   help="the fast path's memory format (auto: what the stage scripts choose for the device); "
                        "with --amp, how another CPU's defaults are measured here (docs/BENCHMARKS.md, AVX2)")
    p.add_argument("--quick", action="store_true", help="few steps: about 30 s on 2 quiet CPU cores")
    p.add_argument("--growth", action="store_true", help="also epoch times for res20/56/110 x batch 64/128/256")
    p.add_argument("--ablation", nargs="*", choices=ABLATIONS, default=None, metavar="NAME",
                   help="also the fast path with each optimisation flipped (names: only those, of "
                        f"{', '.join(ABLATIONS)})")
    p.add_argument("--methods", nargs="*", choices=tuple(METHODS), default=None, metavar="METHOD",
                   help="also the student step of these methods against KD's (no names: every method but CE)")
    p.add_argument("--project", nargs="*", choices=MODEL_NAMES, default=None, metavar="TEACHER",
                   help="also the cost of reproduce.py --preset PRESET (--preset) with and without grouping, from "
                        "steps measured here (no names: all its teachers; names: only their rows)")
    p.add_argument("--preset", choices=tuple(PRESETS), default=PROJECTED,
                   help="the preset --project prices (e.g. repdistiller-cifar100-cross, RepDistiller's table 2)")
    p.add_argument("--group", nargs="+", action="append", choices=tuple(METHODS), metavar="METHOD",
                   help="also these students of the teacher as one group against each alone, one after another "
                        "(repeat the flag for several groups), e.g. --group kd at crd dih")
    args = p.parse_args(argv)
    args.stages = [] if args.stages == "none" else [s.strip() for s in args.stages.split(",") if s.strip()]
    if not set(args.stages) <= set(STAGES) or not (args.stages or args.methods is not None or args.group
                                                     or args.project is not None):
        p.error(f"--stages must name some of {', '.join(STAGES)} (or none, with --methods, --group or --project), got "
                f"{','.join(args.stages)!r}")
    for names in args.group or []:
        alone = [name for name in names if METHODS[name].teacher != "plain" or METHODS[name].assistant]
        if alone or len(set(names)) != len(names):
            p.error(f"--group {' '.join(names)}: name distinct methods taught by the teacher itself "
                    f"({alone[0] if alone else 'a repeated one'} is not one)")
    for name, quick, full in (("steps", 2, 20), ("warmup", 1, 5), ("repeats", 3, 5)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.steps, args.repeats, args.num_classes - 1) < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be at least 1, --warmup at least 0, --num_classes at least 2")
    return args


def engine_config(args: argparse.Namespace) -> tuple[torch.device, TrainConfig]:
    """The device and `TrainConfig` that the stage scripts build for these flags (cli.parse decides amp,
    compile, channels_last and cudnn.benchmark per device type); `--channels_last on|off` overrides the layout."""
    argv = ["--batch_size", str(args.batch_size), "--amp", args.amp, "--compile", args.compile]
    _, device, cfg = cli.parse(cli.common_parser(""), argv + (["--gpu_id", args.gpu_id] if args.gpu_id else []))
    if args.channels_last != "auto":
        cfg = dataclasses.replace(cfg, channels_last=args.channels_last == "on")
    return device, cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pipeline"]:  # the input pipeline of image folders: its own flags (benchmarks/pipeline.py)
        from .pipeline import main as pipeline_main

        pipeline_main(argv[1:])
        return 0
    args = parse_args(argv)
    device, cfg = engine_config(args)
    plan = Plan(args.warmup, args.steps, args.repeats)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    print(f"bench: {args.teacher} -> {args.student}, {args.num_classes} classes, batch {cfg.batch_size} on "
          f"{device_name(device)}; torch {torch.__version__}; {plan.repeats} repeats x {plan.steps} steps after "
          f"{plan.warmup} warm-up; random-init teacher and heads (BN-calibrated) on random uint8 images; "
          f"load average {load_before:.2f}", flush=True)
    if load_before > 0.5 * (os.cpu_count() or 1):
        print(f"bench.py: warning: the machine is busy (load average {load_before:.1f} on {os.cpu_count()} cores); "
              f"CPU-side timings will be unreliable", file=sys.stderr)
    work = Workload.build(args.teacher, args.student, args.num_classes, cfg, device, plan)
    results = compare(work, args.stages)
    extra: dict[str, Any] = {}
    if args.ablation is not None:
        extra["ablation"] = ablation(work, args.stages, args.ablation)
    if args.growth:
        extra["growth"] = growth(args, cfg, device, plan)
    if args.methods is not None:
        extra["methods"] = method_costs(work, args.methods or [m for m in METHODS if m != "ce"])
    if args.group:
        extra["groups"] = [group_costs(work, names) for names in args.group]
    if args.project is not None:
        extra["projection"] = projection(args.project, args.num_classes, cfg, device, plan, args.preset)
    headline = next((r for r in results if r["stage"] == "dih"), results[-1] if results else {})
    failed = [r["stage"] for r in results if not r["loss_check"]["ok"]]
    groups = [*extra.get("groups", []), *(group for row in extra.get("projection", {}).get("teachers", [])
                                          for group in row["groups"])]
    unequal = [s["method"] for group in groups for s in group["students"] if not s["ok"]]
    total_s, load_after = time.perf_counter() - started, os.getloadavg()[0]
    print(f"\ntotal {total_s:.0f}s, load average {load_after:.2f}", flush=True)
    print(json.dumps({
        **({"stage": headline["stage"]} if headline else {}),
        "device": device_name(device),
        "batch_size": cfg.batch_size,
        **{key: value for key, value in headline.items() if key != "stage"},
        "teacher": args.teacher,
        "student": args.student,
        "num_classes": args.num_classes,
        "amp": cfg.amp,
        "compile": cfg.compile,
        "cuda_graphs": cfg.cuda_graphs,
        "channels_last": cfg.channels_last,
        "plan": dataclasses.asdict(plan),
        "torch": torch.__version__,
        "total_s": round(total_s, 1),
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],  # other work on the machine skews timings
        "stages": {r["stage"]: {k: r[k] for k in JSON_KEYS[3:]} for r in results},
        **extra,
    }))
    if failed:
        print(f"bench.py: error: the fast and conventional losses differ for {', '.join(failed)}", file=sys.stderr)
        return 1
    if unequal:
        print(f"bench.py: error: in a group, the losses of {', '.join(unequal)} differ from their runs alone",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.main_guard(lambda argv: sys.exit(main(argv)))
