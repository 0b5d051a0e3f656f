"""The repdistiller-cifar100 preset: RepDistiller's pairs under its recipe, teachers imported from its public
checkpoints, and the published numbers beside ours."""

from __future__ import annotations

import csv
import json
import shlex

import pytest
from helpers import repdistiller_checkpoint
from test_report import write_run

import reproduce
from data import make_synthetic, save_npz
from models import REPDISTILLER_NAMES
from sweep.graph import dataset_matches
from sweep.grid import PRESETS, grid_flags, make_sweep
from sweep.published import read_published
from sweep.report import report
from utils import UserError

PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("res56", "res20"), ("res110", "res20"),
         ("res110", "res32"), ("res32x4", "res8x4"), ("vgg13", "vgg8")]
DKD_BETA = {("res56", "res20"): 2.0, ("res110", "res20"): 2.0, ("res110", "res32"): 2.0, ("res32x4", "res8x4"): 8.0,
            ("vgg13", "vgg8"): 6.0, ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0}
RECIPE = ["--epochs", "240", "--batch_size", "64", "--lr", "0.05", "--momentum", "0.9", "--wd", "0.0005",
          "--no-nesterov", "--schedule", "150", "180", "210", "--gamma", "0.1"]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def dry_run(capsys, *extra: str) -> list[list[str]]:
    """The preset's commands, one process per student (--no_group) so that each names its own flags."""
    reproduce.main(["--preset", "repdistiller-cifar100", "--dry_run", "--no_group", *extra])
    return [shlex.split(line, comments=True) for line in capsys.readouterr().out.splitlines()
            if not line.startswith("#")]


def test_the_dry_run_lists_every_run_of_the_seven_pairs(capsys):
    commands = dry_run(capsys)
    seeds = ["30", "50", "67"]
    students = [c for c in commands if c[1].endswith("test_dih.py")]
    by_method: dict[str, set] = {}
    for c in students:
        method, student, seed = flag(c, "--method"), flag(c, "--student"), flag(c, "--seed")
        teacher = flag(c, "--teacher") if "--teacher" in c else None
        by_method.setdefault(method, set()).add((teacher, student, seed))
        assert c[c.index("--epochs"):c.index("--epochs") + len(RECIPE)] == RECIPE
        if method == "dkd":
            assert [flag(c, k) for k in ("--alpha", "--beta", "--temperature", "--warmup")] == [
                "1.0", str(DKD_BETA[(teacher, student)]), "4.0", "20"]
        if method in ("kd", "fitnets"):
            assert (flag(c, "--alpha"), flag(c, "--temperature")) == ("0.9", "4.0")
        if method == "dih":
            assert (flag(c, "--alpha"), flag(c, "--temperature")) == ("0.1", "5.0")
        if method in ("at", "crd"):
            assert (flag(c, "--alpha"), flag(c, "--beta")) == ("0.0", {"at": "1000.0", "crd": "0.8"}[method])
    every_pair = {(t, s, seed) for t, s in PAIRS for seed in seeds}
    assert set(by_method) == {"ce", "kd", "fitnets", "at", "crd", "dih", "dkd"}
    assert all(by_method[m] == every_pair for m in ("kd", "fitnets", "at", "crd", "dih", "dkd"))
    assert by_method["ce"] == {(None, s, seed) for _, s in PAIRS for seed in seeds}  # one CE run per student
    teachers = [c for c in commands if c[1].endswith("train_teacher.py")]
    heads = [c for c in commands if c[1].endswith("train_heads.py")]
    assert len(teachers) == len(heads) == 5 * 3 and len(students) == 6 * 3 + 6 * 7 * 3
    assert all(c[c.index("--epochs"):c.index("--epochs") + len(RECIPE)] == RECIPE for c in teachers + heads)


def test_grouped_the_preset_runs_each_teachers_students_in_one_process(capsys):
    """The default: per teacher run, one test_dih.py with every distilling method and each one's own flags."""
    reproduce.main(["--preset", "repdistiller-cifar100", "--dry_run"])
    commands = [shlex.split(line, comments=True) for line in capsys.readouterr().out.splitlines()
                if not line.startswith("#")]
    groups = [c for c in commands if c[1].endswith("test_dih.py") and "--teacher" in c]
    assert len(groups) == len(PAIRS) * 3
    for c in groups:
        methods = c[c.index("--method") + 1:c.index("--teacher")]
        assert methods == ["kd", "fitnets", "at", "crd", "dih", "dkd"]
        teacher, student = flag(c, "--teacher"), flag(c, "--student")
        assert flag(c, "--dkd.beta") == str(DKD_BETA[(teacher, student)]) and flag(c, "--dih.alpha") == "0.1"
        assert {flag(c, f"--{m}.out_dir").split("/")[-1].split("-")[2] for m in methods} == set(methods)


def test_every_teacher_can_come_from_the_public_checkpoints(capsys, tmp_path):
    for name in ("wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13"):
        (tmp_path / f"{name}_vanilla").mkdir()
        (tmp_path / f"{name}_vanilla" / "ckpt_epoch_240.pth").touch()
    commands = dry_run(capsys, "--import_teachers", str(tmp_path))
    teachers = [c for c in commands if c[1].endswith("train_teacher.py")]
    assert len(commands) == 174 and len(teachers) == 15
    for c in teachers:  # an import: no training flags, the same public file for every seed
        theirs = REPDISTILLER_NAMES[flag(c, "--model")]
        assert flag(c, "--import") == str(tmp_path.resolve() / f"{theirs}_vanilla" / "ckpt_epoch_240.pth")
        assert "--epochs" not in c and "--lr" not in c
    (tmp_path / "vgg13_vanilla" / "ckpt_epoch_240.pth").unlink()
    with pytest.raises(UserError, match=r"--import_teachers: no .*vgg13_vanilla/ckpt_epoch_240\.pth"):
        dry_run(capsys, "--import_teachers", str(tmp_path))
    with pytest.raises(UserError, match="res18 has no public checkpoint to import"):
        dry_run(capsys, "--import_teachers", str(tmp_path), "--pairs", "res18:res8")


def test_the_sweep_survives_the_round_trip_through_its_flags(tmp_path):
    (tmp_path / "resnet56_vanilla").mkdir()
    (tmp_path / "resnet56_vanilla" / "ckpt_epoch_240.pth").touch()
    parse = reproduce.build_parser().parse_args
    sweep = make_sweep(parse(["--preset", "repdistiller-cifar100", "--pairs", "res56:res20", "res56:res8",
                              "--import_teachers", str(tmp_path)]))
    assert sweep.pairs == [("res56", "res20"), ("res56", "res8")] and sweep.students == ["res20", "res8"]
    assert sweep.hyper("dkd", "res56", "res20")["beta"] == 2.0 and sweep.hyper("dkd", "res56", "res8")["beta"] == 8.0
    assert make_sweep(parse(grid_flags(sweep))) == sweep  # how the Slurm report job rebuilds it
    with pytest.raises(UserError, match="give either --pairs or --teachers/--students"):
        make_sweep(parse(["--pairs", "res56:res20", "--teachers", "res56"]))
    with pytest.raises(UserError, match="TEACHER:STUDENT"):
        make_sweep(parse(["--pairs", "res56-res20"]))


def test_each_published_number_names_its_source():
    entries = read_published(PRESETS["repdistiller-cifar100"]["published"])
    assert {(e.teacher, e.student) for e in entries} == set(PAIRS)
    assert all(e.source for e in entries) and len(entries) == 7 * 7
    missing = [e for e in entries if e.accuracy is None]
    assert [(e.teacher, e.student, e.method) for e in missing] == [("res110", "res20", "dkd")]
    assert all(e.measure == ("best-mean" if e.method == "dkd" else "final") for e in entries)


def test_a_published_file_without_sources_is_refused(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text("teacher,student,method,accuracy,measure,source\nres56,res20,kd,70.66,final,\n")
    with pytest.raises(UserError, match="line 2: a measure .* and a source are needed"):
        read_published(path)


def test_the_preset_machinery_runs_through_every_stage_to_the_table_with_the_published_column(tmp_path):
    """One pair on 64 images for one epoch: the teacher imported from a RepDistiller checkpoint built here, its heads,
    CE, DKD and DIH students, and the table with RepDistiller's and mdistiller's numbers beside ours."""
    save_npz(tmp_path / "tiny.npz", *make_synthetic(64, 32, seed=0))
    public = tmp_path / "save" / "models"
    (public / "resnet56_vanilla").mkdir(parents=True)
    repdistiller_checkpoint(public / "resnet56_vanilla" / "ckpt_epoch_240.pth", "resnet56", 10)
    argv = ["--preset", "repdistiller-cifar100", "--pairs", "res56:res20", "--dataset", str(tmp_path / "tiny.npz"),
            "--seeds", "30", "--epochs", "1", "--methods", "ce", "dkd", "dih", "--import_teachers", str(public),
            "--runs_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results"), "--jobs", "2"]
    outcome = reproduce.main(argv)
    assert not outcome.failed and not outcome.skipped
    assert sorted(node.label for node in outcome.launched) == sorted([
        "teacher res56 seed 30 (imported)", "heads res56 seed 30", "ce student res20 seed 30",
        "dih dkd students res20 <- res56 seed 30"])  # the teacher's students: one group, one process
    runs = tmp_path / "runs" / "tiny"
    teacher = json.loads((runs / "teacher-res56-seed30" / "summary.json").read_text())
    assert teacher["imported_epoch"] == 240 and teacher["imported_accuracy"] == pytest.approx(72.34, abs=1e-4)
    ce = json.loads((runs / "student-res20-ce-seed30" / "summary.json").read_text())
    dkd = json.loads((runs / "student-res20-dkd-res56-a1-t4-b2-seed30" / "summary.json").read_text())
    assert (dkd["beta"], dkd["warmup"], dkd["config"]["nesterov"], dkd["config"]["lr"]) == (2.0, 20, False, 0.05)

    out = tmp_path / "results" / "repdistiller-cifar100"
    table = (out / "results.md").read_text()
    assert "## Against the literature" in table and "the published numbers are for cifar100" in table
    lines = {row["method"]: row for row in csv.DictReader((out / "literature.csv").open())}
    assert set(lines) == {"teacher", "ce", "dkd"}  # the published numbers of the methods this sweep ran
    for method, name, published, ours in (
            ("teacher", "teacher", 72.34, teacher["final_test_acc"]), ("ce", "CE", 69.06, ce["final_test_acc"]),
            ("dkd", "DKD", 71.97, dkd["best_test_acc"])):  # DKD's published number is a best epoch's (mdistiller's)
        row = lines[method]
        assert float(row["published"]) == published and float(row["ours mean"]) == pytest.approx(ours)
        assert float(row["ours - published"]) == pytest.approx(ours - published)
        assert f"| res56 → res20 | {name} | {published:.2f} |" in table
        assert f"{ours - published:+.2f} |" in table
    assert "HobbitLong/RepDistiller README.md" in lines["ce"]["source"] and "mdistiller" in lines["dkd"]["source"]


# ------------------------------------------------------------------ RepDistiller's table 2: across architectures

CROSS_PAIRS = [("vgg13", "mobilenetv2"), ("res50", "mobilenetv2"), ("res50", "vgg8"), ("res32x4", "shufflev1"),
               ("res32x4", "shufflev2"), ("wrn_40_2", "shufflev1")]
# mdistiller's configs/cifar100/dkd: vgg13_mv2.yaml says 6, the others nothing (its default 8); res50 -> vgg8 has no
# config (⚑ 8).
CROSS_DKD_BETA = {pair: 6.0 if pair == ("vgg13", "mobilenetv2") else 8.0 for pair in CROSS_PAIRS}
SMALL_STUDENTS = ("mobilenetv2", "shufflev1", "shufflev2")  # RepDistiller's train_student.py: lr 0.01


def test_the_cross_dry_run_lists_the_six_pairs_with_lr_001_for_the_small_students(capsys):
    reproduce.main(["--preset", "repdistiller-cifar100-cross", "--dry_run", "--no_group"])
    commands = [shlex.split(line, comments=True) for line in capsys.readouterr().out.splitlines()
                if not line.startswith("#")]
    students = [c for c in commands if c[1].endswith("test_dih.py")]
    pairs = set()
    for c in students:
        method, student = flag(c, "--method"), flag(c, "--student")
        lr = "0.01" if student in SMALL_STUDENTS else "0.05"
        assert c[c.index("--epochs"):c.index("--epochs") + len(RECIPE)] == [*RECIPE[:5], lr, *RECIPE[6:]]
        if method != "ce":
            pairs.add((flag(c, "--teacher"), student))
        if method == "dkd":
            assert flag(c, "--beta") == str(CROSS_DKD_BETA[(flag(c, "--teacher"), student)])
    assert pairs == set(CROSS_PAIRS) and len(students) == 4 * 3 + 6 * 6 * 3  # CE once per student model and seed
    teachers_and_heads = [c for c in commands if not c[1].endswith("test_dih.py")]
    assert len(teachers_and_heads) == 2 * 4 * 3 and all(flag(c, "--lr") == "0.05" for c in teachers_and_heads)

    reproduce.main(["--preset", "repdistiller-cifar100-cross", "--dry_run", "--pairs", "res50:mobilenetv2"])
    commands = [shlex.split(line, comments=True) for line in capsys.readouterr().out.splitlines()
                if not line.startswith("#")]
    groups = [c for c in commands if c[1].endswith("test_dih.py") and "--teacher" in c]
    assert len(groups) == 3 and all(flag(c, "--lr") == "0.01" and flag(c, "--teacher") == "res50" for c in groups)


def test_the_cross_sweep_survives_the_round_trip_through_its_flags():
    parse = reproduce.build_parser().parse_args
    sweep = make_sweep(parse(["--preset", "repdistiller-cifar100-cross", "--pairs", "res50:vgg8", "vgg13:mobilenetv2"]))
    assert (sweep.recipe_of("vgg8", "kd")["lr"], sweep.recipe_of("mobilenetv2", "kd")["lr"]) == (0.05, 0.01)
    assert sweep.hyper("dkd", "vgg13", "mobilenetv2")["beta"] == 6.0
    assert sweep.hyper("dkd", "res50", "vgg8")["beta"] == 8.0
    assert make_sweep(parse(grid_flags(sweep))) == sweep


def test_each_cross_published_number_names_its_source():
    entries = read_published(PRESETS["repdistiller-cifar100-cross"]["published"])
    assert {(e.teacher, e.student) for e in entries} == set(CROSS_PAIRS) and len(entries) == 6 * 7
    number = {(e.teacher, e.student, e.method): e.accuracy for e in entries}
    methods = ("teacher", "ce", "kd", "fitnets", "at", "crd")
    assert [number[("vgg13", "mobilenetv2", m)] for m in methods] == [74.64, 64.60, 67.37, 64.14, 59.40, 69.73]
    assert [number[("res32x4", "shufflev2", m)] for m in methods] == [79.42, 71.82, 74.45, 73.54, 72.73, 75.65]
    assert {pair: number[(*pair, "dkd")] for pair in CROSS_PAIRS} == {
        ("res32x4", "shufflev1"): 76.45, ("wrn_40_2", "shufflev1"): 76.70, ("vgg13", "mobilenetv2"): 69.71,
        ("res50", "mobilenetv2"): 70.35, ("res32x4", "shufflev2"): 77.07, ("res50", "vgg8"): None}
    assert all(e.measure == ("best-mean" if e.method == "dkd" else "final") and e.source for e in entries)
    mislabelled = next(e for e in entries if (e.teacher, e.student, e.method) == ("res32x4", "shufflev2", "dkd"))
    assert "headed 'ResNet32x4 <br> MobileNet-V2', a mislabel" in mislabelled.source
    assert "res32x4_shuv2.yaml" in mislabelled.source and "74.45" in mislabelled.source


def test_a_cross_pair_runs_through_every_stage_to_the_table_with_the_published_column(tmp_path):
    """res50 -> mobilenetv2 on 32 images of 16 pixels for two epochs: the ResNet50 teacher imported from a RepDistiller
    checkpoint built here, its heads, CE, DKD and DIH students at lr 0.01, and the table with the published numbers."""
    x_train, y_train, x_test, y_test = make_synthetic(32, 16, seed=0)
    save_npz(tmp_path / "tiny.npz", x_train[:, ::2, ::2], y_train, x_test[:, ::2, ::2], y_test)
    public = tmp_path / "save" / "models"
    (public / "ResNet50_vanilla").mkdir(parents=True)
    repdistiller_checkpoint(public / "ResNet50_vanilla" / "ckpt_epoch_240.pth", "ResNet50", 10)
    argv = ["--preset", "repdistiller-cifar100-cross", "--pairs", "res50:mobilenetv2", "--dataset",
            str(tmp_path / "tiny.npz"), "--seeds", "30", "--epochs", "2", "--methods", "ce", "dkd", "dih",
            "--import_teachers", str(public), "--runs_dir", str(tmp_path / "runs"), "--results_dir",
            str(tmp_path / "results"), "--jobs", "2"]
    outcome = reproduce.main(argv)
    assert not outcome.failed and not outcome.skipped
    runs = tmp_path / "runs" / "tiny"
    teacher = json.loads((runs / "teacher-res50-seed30" / "summary.json").read_text())
    assert teacher["imported_epoch"] == 240 and teacher["model"] == "res50"
    ce = json.loads((runs / "student-mobilenetv2-ce-seed30" / "summary.json").read_text())
    dkd = json.loads((runs / "student-mobilenetv2-dkd-res50-a1-t4-b8-seed30" / "summary.json").read_text())
    heads = json.loads((runs / "heads-res50-seed30" / "summary.json").read_text())
    assert ce["config"]["lr"] == dkd["config"]["lr"] == 0.01 and heads["config"]["lr"] == 0.05

    out = tmp_path / "results" / "repdistiller-cifar100-cross"
    table = (out / "results.md").read_text()
    lines = {row["method"]: row for row in csv.DictReader((out / "literature.csv").open())}
    assert set(lines) == {"teacher", "ce", "dkd"}
    for method, name, published, ours in (
            ("teacher", "teacher", 79.34, teacher["final_test_acc"]), ("ce", "CE", 64.60, ce["final_test_acc"]),
            ("dkd", "DKD", 70.35, dkd["best_test_acc"])):
        assert float(lines[method]["published"]) == published
        assert float(lines[method]["ours - published"]) == pytest.approx(ours - published)
        assert f"| res50 → mobilenetv2 | {name} | {published:.2f} |" in table


# ------------------------------------------------------------------ ImageNet: ResNet-34 -> ResNet-18

# mdistiller's configs/imagenet/r34_r18/*.yaml: batch 512, lr 0.2 for KD, AT and DKD (kd.yaml, at.yaml, dkd.yaml),
# 256 and 0.1 for CRD (crd.yaml) and the base (CE, the heads run); DIH takes KD's (⚑).
IMAGENET_RECIPE = {"ce": ("256", "0.1"), "kd": ("512", "0.2"), "at": ("512", "0.2"), "crd": ("256", "0.1"),
                   "dih": ("512", "0.2"), "dkd": ("512", "0.2")}
IMAGENET_COMMON = ["--momentum", "0.9", "--wd", "0.0001", "--no-nesterov", "--schedule", "30", "60", "90",
                   "--gamma", "0.1"]
TORCHVISION_RESNET34 = "resnet34-b627a593.pth"  # torch hub's cache name of torchvision's IMAGENET1K_V1 weights


def imagenet_dry_run(capsys, *extra: str) -> tuple[reproduce.Outcome, list[list[str]]]:
    outcome = reproduce.main(["--preset", "imagenet", "--data_dir", "/data/ilsvrc2012", "--dry_run", *extra])
    return outcome, [shlex.split(line, comments=True) for line in capsys.readouterr().out.splitlines()
                     if not line.startswith("#")]


def test_the_imagenet_dry_run_lists_every_run_with_its_methods_own_recipe(capsys, tmp_path):
    (tmp_path / TORCHVISION_RESNET34).touch()
    _, commands = imagenet_dry_run(capsys, "--no_group", "--import_teachers", str(tmp_path))
    by_script = {script: [c for c in commands if c[1].endswith(script)]
                 for script in ("train_teacher.py", "train_heads.py", "test_dih.py")}
    (teacher,), (heads,) = by_script["train_teacher.py"], by_script["train_heads.py"]
    assert flag(teacher, "--model") == "resnet34" and flag(teacher, "--import") == str(tmp_path / TORCHVISION_RESNET34)
    assert "--epochs" not in teacher and flag(teacher, "--dataset") == "imagenet"
    assert flag(heads, "--data_dir") == "/data/ilsvrc2012" and flag(heads, "--epochs") == "100"
    assert (flag(heads, "--batch_size"), flag(heads, "--lr")) == IMAGENET_RECIPE["ce"]
    students = {flag(c, "--method"): c for c in by_script["test_dih.py"]}
    assert set(students) == set(IMAGENET_RECIPE) and len(by_script["test_dih.py"]) == len(IMAGENET_RECIPE)
    for method, c in students.items():
        assert flag(c, "--student") == "resnet18" and flag(c, "--epochs") == "100"
        assert (flag(c, "--batch_size"), flag(c, "--lr")) == IMAGENET_RECIPE[method], method
        start = c.index("--momentum")
        assert c[start:start + len(IMAGENET_COMMON)] == IMAGENET_COMMON
    hyper = {method: {key: flag(c, f"--{key}") for key in ("alpha", "beta", "temperature", "warmup",
                                                            "cohort_reduction") if f"--{key}" in c}
             for method, c in students.items()}
    assert hyper["kd"] == {"alpha": "0.5", "temperature": "1.0"}  # kd.yaml: CE 0.5 + KD 0.5, T 1
    assert hyper["dkd"] == {"alpha": "1.0", "beta": "0.5", "temperature": "1.0", "warmup": "1"}  # dkd.yaml, cfg.py
    assert hyper["dih"] == {"alpha": "0.5", "temperature": "1.0", "cohort_reduction": "mean"}
    assert (hyper["at"]["beta"], hyper["crd"]["beta"]) == ("1000.0", "0.8")

    (tmp_path / TORCHVISION_RESNET34).unlink()
    with pytest.raises(UserError, match=r"no .*resnet34-b627a593\.pth \(torchvision\.models\.resnet34"):
        imagenet_dry_run(capsys, "--import_teachers", str(tmp_path))


def test_imagenet_groups_are_split_by_batch_size(capsys):
    """KD, AT, DIH and DKD (batch 512) share a process; CRD (batch 256) cannot share their batches: its own node."""
    outcome, commands = imagenet_dry_run(capsys)
    taught = [c for c in commands if c[1].endswith("test_dih.py") and "--teacher" in c]
    by_methods = {tuple(c[c.index("--method") + 1:c.index("--teacher")]): c for c in taught}
    assert set(by_methods) == {("kd", "at", "dih", "dkd"), ("crd",)}
    for methods, c in by_methods.items():
        assert (flag(c, "--batch_size"), flag(c, "--lr")) == IMAGENET_RECIPE[methods[0]]
    folders = [node.out_dir.name for node in outcome.nodes if node.label.startswith("kd at dih dkd students")]
    assert folders == ["group-resnet18-resnet34-b512-lr0.2-seed30"]  # not the folder of a group of the base recipe
    assert len({node.out_dir for node in outcome.nodes}) == len(outcome.nodes) == 5


def test_the_imagenet_sweep_survives_the_round_trip_through_its_flags():
    parse = reproduce.build_parser().parse_args
    sweep = make_sweep(parse(["--preset", "imagenet", "--data_dir", "/data/ilsvrc2012", "--methods", "kd", "crd"]))
    assert sweep.recipe_of("resnet18", "kd") == {"batch_size": 512, "lr": 0.2}
    assert sweep.recipe_of("resnet18", "crd") == sweep.recipe_of("resnet18") == {"batch_size": 256, "lr": 0.1}
    assert make_sweep(parse(grid_flags(sweep))) == sweep


def test_each_imagenet_published_number_names_its_source():
    entries = read_published(PRESETS["imagenet"]["published"])
    assert {(e.teacher, e.student) for e in entries} == {("resnet34", "resnet18")}
    assert all(e.source and e.accuracy is not None for e in entries)
    numbers = {(e.method, e.accuracy): e for e in entries}
    assert sorted(numbers) == sorted([("teacher", 73.314), ("ce", 69.758), ("kd", 71.03), ("kd", 71.37),
                                      ("at", 70.70), ("at", 70.90), ("crd", 71.17), ("crd", 70.93), ("dkd", 71.70)])
    for original, reproduction in ((("at", 70.70), ("at", 70.90)), (("crd", 71.17), ("crd", 70.93))):
        assert "'Original work'" in numbers[original].source and "torchdistill's reproduction" in \
            numbers[reproduction].source
    assert "mdistiller README.md" in numbers[("dkd", 71.70)].source
    assert numbers[("kd", 71.37)].measure == "best" and numbers[("ce", 69.758)].measure == "final"


def test_the_imagenet_report_compares_a_finished_sweep_with_each_published_number(tmp_path):
    """Summaries of a fake finished sweep: the section lists every number, AT's and CRD's twice (the original and
    torchdistill's reproduction), each against ours by its measure, with no warning about the data."""
    sweep = make_sweep(reproduce.build_parser().parse_args([
        "--preset", "imagenet", "--data_dir", str(tmp_path), "--runs_dir", str(tmp_path / "runs"),
        "--results_dir", str(tmp_path / "results")]))
    final = {"ce": 69.5, "kd": 70.75, "at": 70.25, "crd": 70.5, "dih": 71.25, "dkd": 71.0}
    write_run(sweep.teacher_dir("resnet34", 30), 73.25)
    write_run(sweep.heads_dir("resnet34", 30), 60.0, heads=[{"tap": "layer3", "final_test_acc": 55.0}])
    for method, accuracy in final.items():  # write_run: the best epoch is the final one
        write_run(sweep.student_dir("resnet18", method, "resnet34", 30), accuracy)
    table = report(sweep)
    assert "## Against the literature" in table and "compare different data" not in table
    lines = list(csv.DictReader((sweep.results_dir / "imagenet" / "literature.csv").open()))
    assert len(lines) == 9
    for line in lines:
        ours = 73.25 if line["method"] == "teacher" else final[line["method"]]
        assert float(line["ours - published"]) == pytest.approx(ours - float(line["published"]))
    assert "| resnet34 → resnet18 | AT | 70.70 | final epoch | 70.25 (n=1) | -0.45 | the AT paper" in table
    assert "| resnet34 → resnet18 | AT | 70.90 | best epoch | 70.25 (n=1) | -0.65 | yoshitomo-matsubara/torchdistill" \
        in table
    assert "| resnet34 → resnet18 | DKD | 71.70 | best epoch | 71.00 (n=1) | -0.70 | megvii-research/mdistiller" \
        in table


def test_imagenet_and_folder_runs_are_recognised_by_the_name_their_summary_records(tmp_path):
    """A finished stage run records `imagenet:<hash>` or `folder:<tag>:<hash>`, never the --dataset given."""
    (tmp_path / "pets").mkdir()
    assert dataset_matches("imagenet:0123456789ab", "imagenet")
    assert dataset_matches("folder:pets:0123456789ab", str(tmp_path / "pets"))
    assert not dataset_matches("folder:pets:0123456789ab", "imagenet")
    assert not dataset_matches("imagenet:0123456789ab", str(tmp_path / "pets"))
    assert not dataset_matches("cifar100", "imagenet")
