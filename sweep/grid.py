"""What a sweep runs: the presets, the `Sweep` built from them and the flags, and the flags that rebuild it."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torchvision.models import get_model_weights

import cli
from data import DOWNLOADED_NAMES, dataset_tag
from methods import METHODS as REGISTRY
from methods import run_name
from methods.takd import default_assistant
from models import MODEL_NAMES, REPDISTILLER_NAMES, TORCHVISION_NAMES
from utils import UserError, check_seed, parse_schedule

from .published import read_published

METHODS = tuple(REGISTRY)  # every method: the paper's comparison in its table's order, then DKD
PAPER_METHODS = [m for m in METHODS if m != "dkd"]  # the DIH paper's comparison (DKD came after it)
# The methods whose KD term is on by default: --alpha and --temperature apply to them (AT and CRD keep α = 0;
# DKD's α and T are its own terms').
KD_FAMILY = ("kd", "fitnets", "takd", "mhkd", "dih")

# SPEC section 1 (the original's Table 2): the same optimiser settings for every stage and every method
# (BASELINES.md, ground rule 1); each method's own hyper-parameters are its defaults (methods/).
PAPER = {
    "students": ["res8"], "methods": PAPER_METHODS, "seeds": [30, 50, 67], "epochs": 200, "batch_size": 64,
    "lr": 0.1, "momentum": 0.9, "wd": 5e-4, "nesterov": True, "schedule": [60, 120, 180], "gamma": 0.1,
}
# Table 1's teachers (SPEC section 1). ResNet-8 is among its CIFAR ResNets, but it is the student here:
# distilling res8 into res8 is no row of the paper's table.
TABLE1_TEACHERS = ["res14", "res20", "res32", "res56", "res110", "res18", "res34", "vgg11", "wrn_28_2"]
PRESETS: dict[str, dict[str, Any]] = {
    # Sized for `make demo` on 2 AVX2-only CPU cores in fp32 (docs/BENCHMARKS.md, "The demo on a slow CPU"): ten
    # stage runs on synthetic-mini (2,000 images of 16x16) in batches of 32 (short runs want steps), a gentle LR and
    # a tenth of it from epoch 4: the students five epochs, the teacher fifteen (so that it ends above its students,
    # or there is nothing to distil), its heads three. Two runs at a time, one thread each: on two cores that beats
    # one run on two threads, and by far on a busy machine, where OpenMP's threads wait on each other.
    "demo": {
        "dataset": "synthetic-mini", "teachers": ["res20"], "students": ["res8"], "methods": ["ce", "kd", "dih"],
        "seeds": [30, 50], "epochs": 5, "teacher_epochs": 15, "heads_epochs": 3, "batch_size": 32, "lr": 0.05,
        "schedule": [4], "jobs": 2,
    },
    "paper-cifar100": {**PAPER, "dataset": "cifar100", "teachers": TABLE1_TEACHERS},
    "paper-cifar10": {**PAPER, "dataset": "cifar10", "teachers": TABLE1_TEACHERS},
    # Tiny-ImageNet (SPEC section 5). The paper's Tiny-ImageNet teacher-student pairs are in no public file:
    # these four teachers (one per family) into res8 are our choice, labelled as such in the README.
    "paper-tinyimagenet": {**PAPER, "dataset": "tinyimagenet", "teachers": ["res110", "res34", "vgg11", "wrn_28_2"]},
    # RepDistiller's CIFAR-100 benchmark (its README's table 1): its seven same-architecture pairs under its recipe
    # (train_student.py: 240 epochs, lr 0.05 × 0.1 at 150/180/210, batch 64, wd 5e-4, SGD momentum 0.9 without
    # Nesterov), each method with the settings its published number was made with: KD α 0.9 (CE weight 0.1), T 4;
    # AT β 1000 and CRD β 0.8 (our defaults); DKD mdistiller's, its β per pair from its configs/cifar100/dkd/*.yaml
    # (res32x4 -> res8x4 has none there: the default 8). ⚑ res110 -> res20 has no DKD config either: 2, as for its two
    # other 16-channel ResNet pairs. ⚑ FitNets: our two phases, its KD phase with the KD column's α and T.
    # ⚑ DIH: the paper's α 0.1, τ 5. The published numbers beside ours: sweep/published/repdistiller_cifar100.csv.
    "repdistiller-cifar100": {
        "dataset": "cifar100", "pairs": [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("res56", "res20"),
                                         ("res110", "res20"), ("res110", "res32"), ("res32x4", "res8x4"),
                                         ("vgg13", "vgg8")],
        "methods": ["ce", "kd", "fitnets", "at", "crd", "dih", "dkd"], "seeds": [30, 50, 67], "epochs": 240,
        "batch_size": 64, "lr": 0.05, "momentum": 0.9, "wd": 5e-4, "nesterov": False, "schedule": [150, 180, 210],
        "gamma": 0.1,
        "method_hyper": {"kd": {"alpha": 0.9, "temperature": 4.0}, "fitnets": {"alpha": 0.9, "temperature": 4.0}},
        "pair_hyper": {"res56:res20": {"dkd": {"beta": 2.0}}, "res110:res20": {"dkd": {"beta": 2.0}},
                       "res110:res32": {"dkd": {"beta": 2.0}}, "vgg13:vgg8": {"dkd": {"beta": 6.0}},
                       "wrn_40_2:wrn_16_2": {"dkd": {"beta": 6.0}}, "wrn_40_2:wrn_40_1": {"dkd": {"beta": 6.0}}},
        "published": Path(__file__).resolve().parent / "published" / "repdistiller_cifar100.csv",
    },
}
# RepDistiller's CIFAR-100 benchmark, its README's table 2: the six pairs of different architectures, under the same
# recipe but for its rule that MobileNetV2, ShuffleV1 and ShuffleV2 students train at lr 0.01 (its train_student.py:
# `if opt.model_s in ['mobile_half', 'mobile_full', 'ShuffleV1', 'ShuffleV2']: opt.learning_rate = 0.01`; every
# mdistiller config of these pairs says LR 0.01 too), applied here to every student run of those models, CE's
# included. DKD: mdistiller's configs/cifar100/dkd/*.yaml, β 8 (its default) except vgg13_mv2.yaml's 6.
# ⚑ res50 -> vgg8 has no DKD config: β 8, the default, which its one other ResNet50 pair (res50_mv2.yaml) uses.
# The published numbers: sweep/published/repdistiller_cifar100_cross.csv.
PRESETS["repdistiller-cifar100-cross"] = {
    **PRESETS["repdistiller-cifar100"],
    "pairs": [("vgg13", "mobilenetv2"), ("res50", "mobilenetv2"), ("res50", "vgg8"), ("res32x4", "shufflev1"),
              ("res32x4", "shufflev2"), ("wrn_40_2", "shufflev1")],
    "student_lr": {"mobilenetv2": 0.01, "shufflev1": 0.01, "shufflev2": 0.01},
    "pair_hyper": {"vgg13:mobilenetv2": {"dkd": {"beta": 6.0}}},
    "published": Path(__file__).resolve().parent / "published" / "repdistiller_cifar100_cross.csv",
}
# ILSVRC-2012, ResNet-34 -> ResNet-18: the field's ImageNet benchmark under the recipe of its published numbers,
# mdistiller's configs/imagenet/r34_r18/*.yaml (commit e8c5bb3) over its mdistiller/engine/cfg.py defaults: 100 epochs,
# SGD momentum 0.9 without Nesterov (its trainer.py: optim.SGD), wd 1e-4, lr x 0.1 at 30/60/90; batch 256 at lr 0.1 as
# the base (crd.yaml, and torchvision's recipe for its ResNet-18), which CE, CRD and the heads run get. Each method's
# own recipe and settings: kd.yaml batch 512, lr 0.2, T 1, CE weight 0.5 + KD weight 0.5 (our α 0.5); at.yaml batch
# 512, lr 0.2, AT weight 1000 (cfg.py, our default β); dkd.yaml batch 512, lr 0.2, CE weight 1, β 0.5, T 1, warm-up 1
# epoch, α 1 (cfg.py's default: dkd.yaml does not set it); crd.yaml batch 256, lr 0.1, CRD weight 0.8, 16384
# negatives, T 0.07, momentum 0.5, 128 dimensions (cfg.py, our defaults). ⚑ DIH: the KD column's recipe and α 0.5,
# T 1, with the cohort's losses averaged (cohort_reduction mean): DIH minus KD is then the heads' effect alone, in one
# group with KD and on the same batches. ⚑ The heads: the base recipe for the students' 100 epochs (heads_epochs
# follows --epochs). ⚑ One seed: ImageNet runs are costly, and every published number is one run.
# The teacher: torchvision's IMAGENET1K_V1 weights (--import_teachers, torch hub's cache folder); the published
# numbers: sweep/published/imagenet.csv.
PRESETS["imagenet"] = {
    "dataset": "imagenet", "pairs": [("resnet34", "resnet18")], "methods": ["ce", "kd", "at", "crd", "dih", "dkd"],
    "seeds": [30], "epochs": 100, "batch_size": 256, "lr": 0.1, "momentum": 0.9, "wd": 1e-4, "nesterov": False,
    "schedule": [30, 60, 90], "gamma": 0.1,
    "method_recipe": {method: {"batch_size": 512, "lr": 0.2} for method in ("kd", "at", "dkd", "dih")},
    "method_hyper": {"kd": {"alpha": 0.5, "temperature": 1.0},
                     "dkd": {"alpha": 1.0, "beta": 0.5, "temperature": 1.0, "warmup": 1},
                     "dih": {"alpha": 0.5, "temperature": 1.0, "cohort_reduction": "mean"}},
    "published": Path(__file__).resolve().parent / "published" / "imagenet.csv",
}
# Without a preset: the paper's settings on CIFAR-100, for the teachers named by --teachers.
DEFAULTS: dict[str, Any] = {
    **PAPER, "dataset": "cifar100", "data_dir": "./data", "data_url": None, "teachers": [], "teacher_epochs": None,
    "heads_epochs": None, "alpha": None, "temperature": None, "hint_epochs": None, "pairs": None,
    "method_hyper": {}, "pair_hyper": {}, "student_lr": {}, "method_recipe": {}, "import_teachers": None,
    "published": None,
}
# RepDistiller's (and mdistiller's) layout of its public teachers, e.g. save/models/resnet56_vanilla/ckpt_epoch_240.pth.
IMPORT_LAYOUT = "{name}_vanilla/ckpt_epoch_240.pth"


@dataclass(frozen=True)
class Sweep:
    """What to run: the grid and the hyper-parameters every stage run gets."""

    name: str
    dataset: str
    data_dir: str
    data_url: str | None  # a mirror of the dataset's archive, passed to every stage run
    pairs: list[tuple[str, str]]  # (teacher, student): the grid's rows
    methods: list[str]
    seeds: list[int]
    epochs: int
    teacher_epochs: int
    heads_epochs: int
    batch_size: int
    lr: float
    momentum: float
    wd: float
    nesterov: bool
    schedule: list[int]
    gamma: float
    alpha: float | None  # None: each method's default
    temperature: float | None
    hint_epochs: int | None
    method_hyper: dict[str, dict[str, Any]]  # a preset's hyper-parameters per method, over the method's defaults
    pair_hyper: dict[str, dict[str, dict[str, Any]]]  # "teacher:student" -> method -> hyper-parameters, over those
    student_lr: dict[str, float]  # a preset's lr for every student run of a model, in the place of `lr`
    method_recipe: dict[str, dict[str, Any]]  # a preset's batch_size and lr per method, over student_lr and the flags
    import_teachers: Path | None  # teachers imported from this folder (IMPORT_LAYOUT) instead of trained
    published: Path | None  # published accuracies to show beside ours (sweep/published.py)
    runs_dir: Path
    results_dir: Path

    @property
    def teachers(self) -> list[str]:
        return list(dict.fromkeys(teacher for teacher, _ in self.pairs))

    @property
    def students(self) -> list[str]:
        return list(dict.fromkeys(student for _, student in self.pairs))

    def teachers_of(self, student: str) -> list[str]:
        return [teacher for teacher, s in self.pairs if s == student]

    def import_file(self, teacher: str) -> Path | None:
        """The public checkpoint a teacher is imported from (every seed's folder imports it); None: trained."""
        if self.import_teachers is None:
            return None
        return (self.import_teachers / import_layout(teacher)).resolve()

    def recipe_of(self, student: str, method: str | None = None) -> dict[str, Any]:
        """The batch_size and lr of a student run: the preset's for the method (mdistiller's batch 512, lr 0.2 for
        KD on ImageNet), else the preset's lr for the model (RepDistiller's 0.01 for its small students), else the
        sweep's; `method=None`: the model's own, before any method's."""
        return {"batch_size": self.batch_size, "lr": self.student_lr.get(student, self.lr),
                **self.method_recipe.get(method or "", {})}

    def run_dir(self, name: str, seed: int) -> Path:
        """The stage scripts' own default folder for a run (`cli.default_dir`), under --runs_dir."""
        return self.runs_dir / cli.default_dir(dataset_tag(self.dataset), name, seed).relative_to("runs")

    def teacher_dir(self, teacher: str, seed: int, variant: str = "plain") -> Path:
        """A stage-1 teacher's folder; `variant="tofd"` the TOFD teacher's (trained with its aux classifiers)."""
        return self.run_dir(f"teacher-{teacher}" + ("" if variant == "plain" else f"-{variant}"), seed)

    def heads_dir(self, teacher: str, seed: int) -> Path:
        return self.run_dir(f"heads-{teacher}", seed)

    def hyper(self, method: str, teacher: str, student: str) -> dict[str, Any]:
        """The method's hyper-parameters for a pair: its defaults, the preset's for the method and for the pair,
        then --alpha/--temperature applied to the KD family.

        The KD family are the methods whose KD term is on by default (KD, FitNets, TAKD, MHKD, DIH); AT and CRD
        keep α = 0, the setting their baseline stands for.
        """
        hyper = {**REGISTRY[method].defaults, **self.method_hyper.get(method, {}),
                 **self.pair_hyper.get(f"{teacher}:{student}", {}).get(method, {})}
        if method in KD_FAMILY:
            for key in ("alpha", "temperature"):
                if getattr(self, key) is not None:
                    hyper[key] = getattr(self, key)
        if "hint_epochs" in hyper and self.hint_epochs is not None:
            hyper["hint_epochs"] = self.hint_epochs
        return hyper

    def assistant(self, teacher: str) -> str | None:
        """TAKD's assistant for `teacher` (BASELINES.md); None: no TAKD row for it."""
        return default_assistant(teacher)

    def student_dir(self, student: str, method: str, teacher: str, seed: int) -> Path:
        """test_dih.py's own folder name; the CE baseline's names no teacher: one run serves every teacher's row."""
        ta = self.assistant(teacher) if REGISTRY[method].assistant else None
        return self.run_dir(run_name(student, method, teacher, self.hyper(method, teacher, student), ta), seed)


def add_grid_flags(p: argparse.ArgumentParser) -> None:
    """The flags `make_sweep` reads; each defaults to None, meaning: the preset's value, or the paper's."""
    p.add_argument("--preset", choices=tuple(PRESETS), help="a named grid with its hyper-parameters")
    p.add_argument("--dataset", help="cifar10, cifar100, tinyimagenet, synthetic or a PATH.npz")
    p.add_argument("--data_dir", help="where the dataset is read from or downloaded to (default ./data)")
    p.add_argument("--data_url", help="a mirror of the dataset's archive, for every stage run (default: the official)")
    p.add_argument("--teachers", nargs="+", help=f"teacher models, of {', '.join(MODEL_NAMES)}")
    p.add_argument("--students", nargs="+", help="student models (default res8); every teacher teaches every student")
    p.add_argument("--pairs", nargs="+", metavar="TEACHER:STUDENT",
                   help="teacher-student pairs instead of --teachers x --students, e.g. res56:res20 res110:res32")
    p.add_argument("--methods", nargs="+", choices=METHODS, help=f"default: the paper's, {' '.join(PAPER_METHODS)}")
    p.add_argument("--seeds", nargs="+", type=int, help="default: 30 50 67, the paper's")
    p.add_argument("--epochs", type=int, help="epochs of each student run, and of the other stages unless set")
    p.add_argument("--teacher_epochs", type=int, help="epochs of each teacher run (default: --epochs)")
    p.add_argument("--heads_epochs", type=int, help="epochs of each heads run (default: --epochs)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--lr", type=cli.finite_float)
    p.add_argument("--momentum", type=cli.finite_float)
    p.add_argument("--wd", type=cli.finite_float, help="weight decay")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    p.add_argument("--schedule", nargs="+", help="LR milestones, e.g. 60 120 180")
    p.add_argument("--gamma", type=cli.finite_float, help="LR decay factor at each milestone")
    p.add_argument("--alpha", type=cli.finite_float, help="weight of the KD term, for the methods whose KD term is on "
                                                           "by default (KD, FitNets, TAKD, MHKD, DIH; default: each "
                                                           "method's)")
    p.add_argument("--temperature", type=cli.finite_float, help="softmax temperature of those methods' KD term")
    p.add_argument("--hint_epochs", type=int, help="epochs of FitNets' hint phase (default: 40)")
    p.add_argument("--import_teachers", type=Path, metavar="DIR",
                   help="import the teachers from DIR instead of training them; every seed's teacher imports the "
                        "same file: RepDistiller's models from DIR/<its name>_vanilla/ckpt_epoch_240.pth "
                        "(RepDistiller's fetch_pretrained_teachers.sh, mdistiller's cifar_teachers.tar), torchvision's "
                        "from DIR/<its IMAGENET1K_V1 file>, e.g. DIR/resnet34-b627a593.pth (DIR: torch hub's cache, "
                        "~/.cache/torch/hub/checkpoints)")
    p.add_argument("--published", type=Path, metavar="CSV",
                   help="published accuracies to show beside ours (columns teacher, student, method, accuracy, "
                        "measure, source; default: the preset's)")
    p.add_argument("--runs_dir", default="runs", help="root of the run folders")
    p.add_argument("--results_dir", default="results", help="the table and plots go to <results_dir>/<preset>/")


def make_sweep(args: argparse.Namespace) -> Sweep:
    """The preset's values (or the paper's), overridden by the flags given, checked before anything runs."""
    given = {key: value for key, value in vars(args).items() if value is not None}
    preset = PRESETS.get(args.preset, {})
    values = {**DEFAULTS, **preset, **given}
    if "pairs" in given and ({"teachers", "students"} & set(given)):
        raise UserError("--pairs names the teachers and students: give either --pairs or --teachers/--students")
    if "pairs" in given:
        values["pairs"] = [parse_pair(text) for text in given["pairs"]]
    elif {"teachers", "students"} & set(given) or "pairs" not in preset:
        values["pairs"] = [(t, s) for s in values["students"] for t in values["teachers"]]
    for key in ("pairs", "methods", "seeds"):
        values[key] = list(dict.fromkeys(values[key]))  # a name given twice is one grid line
    values["methods"] = [m for m in METHODS if m in values["methods"]]
    if not values["pairs"]:
        raise UserError("the grid is empty: name a --preset or some --teachers")
    unknown = [m for pair in values["pairs"] for m in pair if m not in MODEL_NAMES]
    if unknown:
        raise UserError(f"unknown model {unknown[0]!r}; choose from: {', '.join(MODEL_NAMES)}")
    for key in ("import_teachers", "published"):
        values[key] = None if values[key] is None else Path(values[key])
    if values["import_teachers"] is not None:
        check_imports(values["import_teachers"], [t for t, _ in values["pairs"]])
    if values["published"] is not None:
        read_published(values["published"])  # a malformed file is refused before anything runs
    dataset_tag(values["dataset"])  # an unknown dataset is a DataError, itself a UserError
    values["schedule"] = parse_schedule([str(m) for m in values["schedule"]])
    for key in ("teacher_epochs", "heads_epochs"):
        values[key] = values["epochs"] if values[key] is None else values[key]
    for key in ("epochs", "teacher_epochs", "heads_epochs", "batch_size", "hint_epochs"):
        if values[key] is not None and values[key] < 1:
            raise UserError(f"--{key} must be at least 1, got {values[key]}")
    temperature, alpha = values["temperature"], values["alpha"]
    for key, ok, rule in (("lr", values["lr"] > 0, "positive"), ("gamma", values["gamma"] > 0, "positive"),
                          ("temperature", temperature is None or temperature > 0, "positive"),
                          ("momentum", values["momentum"] >= 0, "non-negative"),
                          ("wd", values["wd"] >= 0, "non-negative"), ("alpha", alpha is None or 0 <= alpha <= 1,
                                                                      "in [0, 1]")):
        if not ok:
            raise UserError(f"--{key} must be {rule}, got {values[key]}")
    for seed in values["seeds"]:
        check_seed(seed, "--seeds")
    for key in given:
        users = methods_using(key)
        if users is not None and not set(users) & set(values["methods"]):
            raise UserError(f"--{key} applies to no method of this grid (only to {' '.join(users)}; the grid has "
                            f"{' '.join(values['methods'])}): drop it, or add one of those to --methods")
    if "data_url" in given and values["dataset"] not in DOWNLOADED_NAMES:
        downloaded = ", ".join(DOWNLOADED_NAMES)
        raise UserError(f"--data_url is a mirror of a downloaded dataset's archive ({downloaded}), and "
                        f"{values['dataset']} has none: drop it")
    values["name"] = args.preset or "custom"
    values["runs_dir"], values["results_dir"] = Path(args.runs_dir), Path(args.results_dir)
    sweep = Sweep(**{f.name: values[f.name] for f in fields(Sweep)})
    if next(student_rows(sweep), None) is None:
        raise UserError(f"the grid is empty: {'; '.join(absent_rows(sweep))}; add a larger teacher to --teachers or "
                        "another method to --methods")
    return sweep


def methods_using(flag: str) -> list[str] | None:
    """The methods a grid flag applies to; None for a flag that applies to every grid."""
    if flag in ("alpha", "temperature"):  # the KD family: see Sweep.hyper
        return list(KD_FAMILY)
    if flag == "heads_epochs":
        return [m for m in METHODS if REGISTRY[m].heads]
    if flag == "hint_epochs":
        return [m for m in METHODS if "hint_epochs" in REGISTRY[m].defaults]
    return None


def student_rows(sweep: Sweep) -> Iterator[tuple[str, str]]:
    """(method, teacher) of every row the grid can have: TAKD needs an assistant for the teacher."""
    for method in sweep.methods:
        for teacher in sweep.teachers:
            if not REGISTRY[method].assistant or sweep.assistant(teacher) is not None:
                yield method, teacher


def absent_rows(sweep: Sweep) -> list[str]:
    """One line per method some of whose rows cannot exist, saying which and why."""
    rows = set(student_rows(sweep))
    lines = []
    for method in sweep.methods:
        missing = [teacher for teacher in sweep.teachers if (method, teacher) not in rows]
        if missing:
            lines.append(f"no {method} row for teacher {' '.join(missing)}: {method} distils through a teacher "
                         f"assistant smaller than the teacher, and none is defined for {' or '.join(missing)}")
    return lines


def parse_pair(text: str) -> tuple[str, str]:
    """`res56:res20` -> ("res56", "res20")."""
    teacher, colon, student = text.partition(":")
    if not colon or not teacher or not student:
        raise UserError(f"--pairs {text!r}: write each pair as TEACHER:STUDENT, e.g. res56:res20")
    return teacher, student


def import_layout(teacher: str) -> str:
    """Where a teacher's public checkpoint lies under --import_teachers: RepDistiller's folder for its models,
    torchvision's file name (its IMAGENET1K_V1 weights, as torch hub caches them) for torchvision's."""
    if teacher in TORCHVISION_NAMES:
        return Path(get_model_weights(teacher)["IMAGENET1K_V1"].url).name
    return IMPORT_LAYOUT.format(name=REPDISTILLER_NAMES[teacher])


def check_imports(folder: Path, teachers: list[str]) -> None:
    """Every teacher has a public checkpoint in `folder`, in its source's layout, before anything runs."""
    for teacher in dict.fromkeys(teachers):
        if teacher not in REPDISTILLER_NAMES and teacher not in TORCHVISION_NAMES:
            raise UserError(f"--import_teachers: {teacher} has no public checkpoint to import (importable: "
                            f"RepDistiller's models {', '.join(REPDISTILLER_NAMES)}; torchvision's "
                            f"{', '.join(TORCHVISION_NAMES)})")
        path = folder / import_layout(teacher)
        if not path.is_file():
            where = (f"torchvision.models.{teacher}(weights='IMAGENET1K_V1') downloads it into torch hub's cache, "
                     "~/.cache/torch/hub/checkpoints" if teacher in TORCHVISION_NAMES else
                     "RepDistiller's scripts/fetch_pretrained_teachers.sh or mdistiller's cifar_teachers.tar put its "
                     "teachers so")
            raise UserError(f"--import_teachers: no {path} ({where})")


def schedule_tokens(schedule: list[int]) -> list[str]:
    """--schedule's values as command-line words; `[]` for none, since the flag takes at least one word."""
    return [str(m) for m in schedule] or ["[]"]


def grid_flags(sweep: Sweep) -> list[str]:
    """Flags from which `make_sweep` rebuilds this very sweep: how a later job (the Slurm report) names it."""
    flags = ["--preset", sweep.name] if sweep.name in PRESETS else []
    for f in fields(Sweep):
        value = getattr(sweep, f.name)
        users = methods_using(f.name)
        if f.name == "name" or value is None or isinstance(value, dict):  # the hyper dicts come with --preset
            continue
        if users is not None and not set(users) & set(sweep.methods):
            continue  # a flag for no method of the grid would be refused
        if f.name == "pairs":
            flags += ["--pairs", *(f"{teacher}:{student}" for teacher, student in value)]
        elif f.name == "schedule":
            flags += ["--schedule", *schedule_tokens(value)]
        elif isinstance(value, bool):
            flags.append(f"--{f.name}" if value else f"--no-{f.name}")
        elif isinstance(value, list):
            flags += [f"--{f.name}", *map(str, value)]
        else:
            flags += [f"--{f.name}", str(value)]
    return flags
