"""The command line shared by the three stage scripts: common flags, defaults, and clean failure."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

import distributed
from data import DEFAULT_PAD_MODE, PAD_MODES, Dataset, dataset_tag, is_streamed, load_dataset
from data.base import one_line
from data.streaming import DECODERS
from engine import TrainConfig
from execution import COMPILE_MODES, choose_execution, cpu_execution_inputs
from utils import UserError, check_seed, parse_schedule, resolve_device


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows every flag's default once: appended unless the help text already says it, lists as typed on the
    command line, nothing for a plain switch or a flag without a default (argparse's own formatter repeats
    a default the text already gives, and shows none for a flag without help text)."""

    def _format_action(self, action: argparse.Action) -> str:
        if not (action.help or "").strip() and self._default_text(action):
            action = copy.copy(action)
            action.help = self._default_text(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = self._default_text(action)
        return f"{text} {default}".strip() if default and "(default" not in text else text

    @staticmethod
    def _default_text(action: argparse.Action) -> str:
        """'(default: ...)' for a flag with a default worth showing, else ''."""
        default = action.default
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if switch or default is None or default is argparse.SUPPRESS:
            return ""
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return f"(default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr (exit 2), like every other bad input, and whose
    help shows each default once."""

    def __init__(self, *args: Any, formatter_class: type[argparse.HelpFormatter] = DefaultsFormatter, **kwargs: Any):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str) -> NoReturn:
        if distributed.rank_in_environment() != 0:  # every process of a job parses alike: rank 0 says it once
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def finite_float(text: str) -> float:
    """argparse type of every float flag: a number, and a finite one (`inf` or `nan` would only show as a
    diverged loss an epoch later, blamed on --lr)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def common_parser(description: str) -> Parser:
    """Flags every stage takes; defaults are the paper's (Table 2 of the original README)."""
    p = Parser(description=description)
    p.add_argument("--dataset", default="cifar100",
                   help="cifar10, cifar100, tinyimagenet, synthetic, imagenet (in --data_dir), a PATH.npz of your own, "
                        "or a folder of images PATH with train/<class>/* and val/<class>/*")
    p.add_argument("--data_dir", default="./data",
                   help="where CIFAR and Tiny-ImageNet are downloaded to / read from; ILSVRC-2012's folder")
    p.add_argument("--image_size", type=int, default=None,
                   help="image folders and imagenet: the side of the training and evaluation crops (default: 224; "
                        "evaluation resizes to S*256/224 first)")
    p.add_argument("--workers", type=int, default=None,
                   help="image folders and imagenet: decoding processes (default: one per usable CPU; 0: none)")
    # None rather than "workers" when absent: runs stored before this flag existed still --resume.
    p.add_argument("--decode", choices=DECODERS, default=None,
                   help="image folders and imagenet: JPEGs decoded by the workers (default), or on the GPU in batches "
                        "(nvjpeg; untested on a GPU so far)")
    p.add_argument("--data_url", default=None,
                   help="a mirror of the dataset's archive (http, https, file:// or a path; default: the official URL)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=64,
                   help="the global batch: on N processes (torchrun, srun) each computes batch_size/N of it")
    p.add_argument("--lr", type=finite_float, default=0.1)
    p.add_argument("--momentum", type=finite_float, default=0.9)
    p.add_argument("--wd", type=finite_float, default=5e-4, help="weight decay")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--schedule", nargs="+", default=["60", "120", "180"],
                   help="epochs after which the LR is multiplied by --gamma: 60 120 180 or [60, 120, 180]")
    p.add_argument("--gamma", type=finite_float, default=0.1,
                   help="LR decay factor (the original README says 0.1, its code defaulted to 0.2)")
    p.add_argument("--seed", type=int, default=30, help="the paper averages seeds 30, 50 and 67")
    p.add_argument("--gpu_id", default=None, help="0, cuda:1 or cpu (default: the first GPU if any, else the CPU)")
    p.add_argument("--out_dir", default=None, help="output folder (default: runs/<dataset>/<run name>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir (a finished run is kept)")
    p.add_argument("--pad_mode", choices=PAD_MODES, default=DEFAULT_PAD_MODE,
                   help="padding of the random crop: zeros (torchvision's default, the authors' code) or reflect")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast (auto: on for CUDA and for CPUs with native bf16, AMX or AVX512-BF16)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                   help="on: torch.compile; graphs: replay each training step from a CUDA graph; max: both "
                        "(auto: off; see docs/BENCHMARKS.md)")
    many = p.add_argument_group("on many processes (torchrun --nproc_per_node N, or srun; README: Many GPUs and nodes)")
    # None rather than False when absent: runs stored before this flag existed still --resume.
    many.add_argument("--sync_bn", action="store_true", default=None,
                      help="batch norm over the global batch (SyncBatchNorm), so that N processes train what one "
                           "does; without it each process normalises its own share, as DistributedDataParallel does")
    many.add_argument("--dist_timeout", type=finite_float, default=distributed.DEFAULT_TIMEOUT_S,
                      help="seconds a process waits for the others before the job stops (a lost or hung process)")
    return p


# The flags that pass into the engine's TrainConfig as they are given (--schedule is parsed first).
RECIPE_FLAGS = ("epochs", "batch_size", "lr", "momentum", "wd", "nesterov", "gamma", "seed", "pad_mode")


def parse(parser: Parser, argv: list[str] | None) -> tuple[argparse.Namespace, torch.device, TrainConfig]:
    """Parse and validate the flags; pick the device; join the job when launched as several processes; build the
    engine's config."""
    args = parser.parse_args(argv)
    world = distributed.environment()
    try:
        check_flags(args, world)
        device = distributed.device_for(args.gpu_id, world) or resolve_device(args.gpu_id)
        execution = choose_execution(device, args.amp, args.compile, **cpu_execution_inputs())
        if world.size > 1 and execution.cuda_graphs:
            raise UserError(f"--compile {args.compile} captures one process's step in CUDA graphs; on {world.size} "
                            "processes use --compile on or off")
    except UserError as err:
        raise distributed.same_on_every_rank(err) from None
    args.world_size = world.size  # recorded with the run: --resume refuses another number of processes
    # Execution's fields (what the device runs) are TrainConfig's own.
    recipe = {name: getattr(args, name) for name in RECIPE_FLAGS}
    cfg = TrainConfig(**recipe, schedule=tuple(args.schedule), sync_bn=bool(args.sync_bn),
                      **dataclasses.asdict(execution))
    if device.type == "cuda":
        # The run's GPU becomes the current one: CUDA graphs' streams and capture, torch.cuda calls without a
        # device, and libraries that assume the current device then all act on it, not on cuda:0.
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    distributed.init(world, device, args.dist_timeout)
    return args, device, cfg


def check_flags(args: argparse.Namespace, world: distributed.World) -> None:
    """Refuse flag values no run can use, with one line (the same on every process of a job)."""
    args.schedule = parse_schedule(args.schedule)
    check_seed(args.seed)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "gamma", "dist_timeout"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("momentum", "wd"):
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name} must be non-negative, got {getattr(args, name)}")
    if args.batch_size % world.size:
        raise UserError(f"--batch_size {args.batch_size} is the global batch, which {world.size} processes share "
                        f"equally: give a multiple of {world.size}")


def default_dir(dataset_tag: str, name: str, seed: int) -> Path:
    """Where a stage writes by default, and where the next stage looks: `runs/<dataset>/<name>-seed<seed>`."""
    return Path("runs") / dataset_tag / f"{name}-seed{seed}"


def run_dir(args: argparse.Namespace, name: str) -> Path:
    """`--out_dir`, or this stage's default folder."""
    return Path(args.out_dir) if args.out_dir else default_dir(dataset_tag(args.dataset), name, args.seed)


def stored_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run's arguments as plain values, to store in checkpoints and compare on --resume."""
    plain = (str, int, float, bool, list, type(None))
    return {key: value for key, value in vars(args).items() if isinstance(value, plain)}


class Terminated(BaseException):
    """SIGTERM (Slurm's scancel, a time limit, `kill`) as an exception, so that `finally` blocks run: locks are
    let go, a sweep stops its stage runs. A BaseException, so that no `except Exception` swallows it."""


def _terminate(signum: int, frame: Any) -> NoReturn:
    global _terminating
    _terminating = True
    raise Terminated


_terminating = False  # SIGTERM came: a collective failing meanwhile is the job stopping, not a lost process


def host_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the host running out of memory (torch's CPU allocator says so in a RuntimeError)."""
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "DefaultCPUAllocator" in str(err))


def main_guard(main: Callable[[list[str] | None], Any], resume_hint: str = "rerun with --resume to continue") -> None:
    """Run a script's main; turn user errors into one line on stderr and exit 2, never a traceback.

    SIGINT and SIGTERM end it with one line and 130 or 143, the shell's codes for those signals, after its
    `finally` blocks; a reader that leaves early (`| head`) ends it quietly, with 141 like a tool killed by SIGPIPE.
    """
    name = Path(sys.argv[0]).name
    signal.signal(signal.SIGTERM, _terminate)
    try:
        try:
            main(None)
            distributed.teardown()
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's last flush goes nowhere
        sys.exit(141)
    except UserError as err:
        if not distributed.quiet(err):  # rank 0 prints what every process of a job met alike
            print(f"{name}: {distributed.who()}error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; {resume_hint}", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print(f"{name}: terminated (SIGTERM); {resume_hint}", file=sys.stderr)
        sys.exit(143)
    except torch.OutOfMemoryError as err:  # CUDA's (and the host's, in torch versions that raise it there)
        where = "host" if host_out_of_memory(err) else "GPU"
        print(f"{name}: error: out of {where} memory; try a smaller --batch_size", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as err:
        if distributed.lost_peer(err):
            if _terminating:
                print(f"{name}: terminated (SIGTERM); {resume_hint}", file=sys.stderr)
                sys.exit(143)
            print(f"{name}: {distributed.lost_ranks_line(err)}", file=sys.stderr)
            sys.exit(1)
        if not host_out_of_memory(err):
            raise
        print(f"{name}: error: out of host memory ({one_line(err)[:200]}); try a smaller --batch_size or free some "
              "memory", file=sys.stderr)
        sys.exit(2)


def load_data(args: argparse.Namespace, device: torch.device) -> Dataset:
    """The dataset named by --dataset, held on `device` (bad data raises `data.DataError`, a `UserError`)."""
    if is_streamed(args.dataset) and args.pad_mode != DEFAULT_PAD_MODE:
        raise UserError("--pad_mode is the padded crop's of the datasets held on the device; image folders and "
                        "imagenet take RandomResizedCrop")
    return load_dataset(args.dataset, args.data_dir, device, url=args.data_url, image_size=args.image_size,
                        workers=args.workers, decode=args.decode)


def print_model_summary(model: torch.nn.Module, device: torch.device, image_size: int) -> None:
    """torchsummary's layer table; imported lazily because it is optional (GPU images often lack it)."""
    try:
        from torchsummary import summary
    except ImportError:
        raise UserError("--summary needs the torchsummary package: pip install torchsummary") from None
    summary(model, (3, image_size, image_size), device=device.type)
