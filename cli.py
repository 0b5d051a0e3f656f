"""The command line shared by the three stage scripts: common flags, defaults, and clean failure."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from checkpoint import expect_match, identity, load_checkpoint, load_weights, model_fingerprint
from data import DEFAULT_PAD_MODE, PAD_MODES, Dataset, dataset_tag, is_streamed, load_dataset
from data.base import one_line
from data.streaming import DECODERS
from engine import EXTRAS_FILE, RESUME_FILE, TrainConfig
from heads import IntermediateHeads
from models import TapModel, build_model, fold_batchnorm
from utils import (
    COMPILE_MODES,
    UserError,
    check_seed,
    choose_execution,
    cpu_execution_inputs,
    parse_schedule,
    resolve_device,
)


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
    p.add_argument("--batch_size", type=int, default=64)
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
    return p


def parse(parser: Parser, argv: list[str] | None) -> tuple[argparse.Namespace, torch.device, TrainConfig]:
    """Parse and validate the flags; pick the device; build the engine's config."""
    args = parser.parse_args(argv)
    args.schedule = parse_schedule(args.schedule)
    check_seed(args.seed)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "gamma"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("momentum", "wd"):
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name} must be non-negative, got {getattr(args, name)}")
    device = resolve_device(args.gpu_id)
    execution = choose_execution(device, args.amp, args.compile, **cpu_execution_inputs())
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        wd=args.wd,
        nesterov=args.nesterov,
        schedule=tuple(args.schedule),
        gamma=args.gamma,
        seed=args.seed,
        amp=execution.amp,
        compile=execution.compile,
        channels_last=execution.channels_last,
        cuda_graphs=execution.cuda_graphs,
        pad_mode=args.pad_mode,
    )
    if device.type == "cuda":
        # The run's GPU becomes the current one: CUDA graphs' streams and capture, torch.cuda calls without a
        # device, and libraries that assume the current device then all act on it, not on cuda:0.
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    return args, device, cfg


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
    raise Terminated


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
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's last flush goes nowhere
        sys.exit(141)
    except UserError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
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
        if not host_out_of_memory(err):
            raise
        print(f"{name}: error: out of host memory ({one_line(err)[:200]}); try a smaller --batch_size or free some "
              "memory", file=sys.stderr)
        sys.exit(2)


def keep_layout(cfg: TrainConfig, out_dir: Path, resume: bool) -> TrainConfig:
    """`cfg` with the memory layout (channels_last) the run in `out_dir` started with, when it is resumed.

    The layout follows the device (on for CUDA and AVX-512 CPUs), and the two layouts' kernels round differently
    (a CPU epoch ends about 1e-3 apart), so a run resumed on another kind of device keeps its own layout and
    stays bit-identical wherever the kernels are the same. Either layout runs on every device.
    """
    path = out_dir / RESUME_FILE
    if not (resume and path.is_file()):
        return cfg
    recorded = load_checkpoint(path, "resume", "--resume", mmap=True).get("channels_last", cfg.channels_last)
    if recorded != cfg.channels_last:
        print(f"resuming in the memory layout the run started with (channels_last={recorded}), not this device's "
              f"default ({cfg.channels_last})")
    return dataclasses.replace(cfg, channels_last=recorded)


def build(name: str, num_classes: int, device: torch.device, channels_last: bool, image_size: int) -> TapModel:
    """Build a registered model on `device`; an unknown name, or images too small for it, is a user error."""
    try:
        model = build_model(name, num_classes)
    except ValueError as err:
        raise UserError(str(err)) from None
    try:
        model.tap_shapes(image_size)  # one batch-1 pass: VGG-11's five max-pools need 32 pixels or more
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0]
        raise UserError(f"{name} cannot classify {image_size}x{image_size} images ({reason})") from None
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


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


def read_teacher(args: argparse.Namespace, name: str, variant: str | None = None) -> dict[str, Any]:
    """The checkpoint of teacher `name`: --teacher_ckpt, or stage 1's default place. Read before any data is.

    Any trained model serves as a plain teacher: a stage-1 teacher.pt (a variant's too: it holds the plain
    model), or any method's student.pt (TAKD's assistant is one). `variant="tofd"` asks for a TOFD teacher
    (trained with its auxiliary classifiers), refuses any other, and reads the extras.pt beside it into
    `ckpt["extras"]`, checked to belong to these very weights.
    """
    folder = f"teacher-{name}" + (f"-{variant}" if variant else "")
    path = Path(args.teacher_ckpt or default_dir(dataset_tag(args.dataset), folder, args.seed) / "teacher.pt")
    command = shlex.join(["python3", "train_teacher.py", "--model", name, *([f"--{variant}"] if variant else []),
                          "--dataset", args.dataset, "--seed", str(args.seed)])
    ckpt = load_checkpoint(path, ("teacher", "student"), "--teacher_ckpt", hint=f"train it with: {command}")
    ckpt.setdefault("image_size", 32)  # written before checkpoints recorded it, when every dataset was 32x32
    if variant is not None:
        if ckpt.get("variant") != variant:
            have = ckpt.get("variant") or "plain"
            raise UserError(f"--teacher_ckpt: {path} holds a {have} {ckpt['kind']}, but this run needs a {variant} "
                            f"teacher; train it with: {command}")
        extras_path = path.parent / EXTRAS_FILE
        extras = load_checkpoint(extras_path, "extras", "--teacher_ckpt",
                                 hint=f"a {variant} teacher keeps its extra modules there; train it with: {command}")
        if extras.get("model_fingerprint") != ckpt["fingerprint"]:
            raise UserError(f"--teacher_ckpt: {extras_path} belongs to other weights than {path} (fingerprints "
                            f"differ); keep each teacher.pt with its own {EXTRAS_FILE}")
        ckpt["extras"] = extras
    ckpt["path"] = str(path)
    return ckpt


def build_teacher(ckpt: dict[str, Any], name: str, data: Dataset, device: torch.device, cfg: TrainConfig,
                  fold: bool = True):
    """The frozen teacher from `read_teacher`'s checkpoint, checked against the data; and its identity.

    The image size is checked before the dataset, so that a 32x32 teacher offered 64x64 data says so. With
    `fold`, what comes back is a copy with its batch norms folded into its convolutions (`models.fold_batchnorm`:
    the same outputs up to float rounding, at less cost), made after the fingerprint check.
    """
    expect_match(ckpt, "--teacher_ckpt", model=name, image_size=data.image_size, num_classes=data.num_classes,
                 dataset=data.name)
    teacher = build(name, data.num_classes, device, cfg.channels_last, data.image_size)
    load_weights(teacher, ckpt, "--teacher_ckpt")
    if model_fingerprint(teacher) != ckpt["fingerprint"]:
        raise UserError(f"--teacher_ckpt: the weights in {ckpt['path']} do not match their recorded fingerprint "
                        "(corrupt?)")
    teacher = fold_batchnorm(teacher) if fold else teacher.eval().requires_grad_(False)
    return teacher, identity(ckpt)


def read_heads(args: argparse.Namespace) -> dict[str, Any]:
    """The stage-2 heads checkpoint (--heads_ckpt or its default place), read before any data is."""
    path = Path(args.heads_ckpt or default_dir(dataset_tag(args.dataset), f"heads-{args.teacher}", args.seed)
                / "heads.pt")
    command = shlex.join(["python3", "train_heads.py", "--teacher", args.teacher, "--dataset", args.dataset,
                          "--seed", str(args.seed)])
    ckpt = load_checkpoint(path, "heads", "--heads_ckpt", hint=f"train them with: {command}")
    ckpt["path"] = str(path)
    return ckpt


def build_heads(ckpt: dict[str, Any], teacher_identity: dict[str, Any], device: torch.device) -> IntermediateHeads:
    """The frozen stage-2 heads from `read_heads`'s checkpoint, refused unless made for this very teacher."""
    if ckpt["teacher"] != teacher_identity:
        mismatch = next(k for k in teacher_identity if ckpt["teacher"].get(k) != teacher_identity[k])
        raise UserError(
            f"--heads_ckpt: {ckpt['path']} was trained on another teacher ({mismatch} "
            f"{ckpt['teacher'].get(mismatch)!r}, this teacher has {teacher_identity[mismatch]!r}); "
            "run train_heads.py for this teacher"
        )
    heads = IntermediateHeads([(name, tuple(shape)) for name, shape in ckpt["taps"]], ckpt["num_classes"],
                              ckpt.get("grid"))
    load_weights(heads, ckpt, "--heads_ckpt")
    return heads.to(device).eval().requires_grad_(False)
