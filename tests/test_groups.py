"""Students trained as a group (test_dih.py --method with several methods): each one's outputs are its own run's,
bit for bit, fresh and after a SIGKILL between two students' checkpoint writes; per-method flags and refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, assert_clean_failure, run_script

import test_dih
import train_heads
import train_teacher
from engine import GroupStep
from methods import METHODS, Method
from students import method_flags
from utils import UserError

EVERY = list(METHODS)  # a new method joins every test here by being registered
FAST = {"hint_epochs": 1, "nce_k": 16}  # hyper-parameters set small, for the methods that take them
OWN = {"kd": {"alpha": 0.5}}  # a method's own value: --kd.alpha in the group
COMMON = ["--student", "res8", "--gpu_id", "cpu", "--batch_size", "16", "--epochs", "2", "--schedule", "1"]
VARY = ("seconds", "wall_time_s")  # how long it took: the only thing a grouped run may record differently


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A 16x16 slice of the synthetic set; a res8 teacher, its heads, a TOFD teacher and a res14 KD assistant."""
    from data import make_synthetic, save_npz

    root = tmp_path_factory.mktemp("inputs")
    x_train, y_train, x_test, y_test = make_synthetic(32, 16, seed=3)  # two batches of 16: two steps an epoch
    save_npz(root / "px16.npz", x_train[:, ::2, ::2], y_train, x_test[:, ::2, ::2], y_test)
    data = ["--dataset", str(root / "px16.npz"), "--gpu_id", "cpu", "--batch_size", "16", "--epochs", "1"]
    train_teacher.main(["--model", "res8", *data, "--out_dir", str(root / "teacher")])
    train_teacher.main(["--model", "res8", "--tofd", *data, "--out_dir", str(root / "tofd")])
    teacher = ["--teacher", "res8", "--teacher_ckpt", str(root / "teacher" / "teacher.pt")]
    train_heads.main([*teacher, *data, "--out_dir", str(root / "heads")])
    test_dih.main(["--method", "kd", "--student", "res14", *teacher, *data, "--out_dir", str(root / "ta")])
    return {"npz": root / "px16.npz", "teacher": root / "teacher" / "teacher.pt", "tofd": root / "tofd" / "teacher.pt",
            "heads": root / "heads" / "heads.pt", "ta": root / "ta" / "student.pt"}


def method_inputs(method: Method, inputs: dict[str, Path]) -> dict[str, str]:
    """The networks a method reads, by flag, as its `Method` record says: its kind of teacher, DIH's heads, TAKD's
    assistant (all of res8's)."""
    files = {"teacher": "res8", "teacher_ckpt": inputs["tofd" if method.teacher == "tofd" else "teacher"],
             "heads_ckpt": inputs["heads"], "ta": "res14", "ta_ckpt": inputs["ta"]}
    return {flag: str(files[flag]) for flag in method.inputs}


def own_values(method: Method) -> dict:
    """The hyper-parameters a method's runs here are given: the small ones it takes, and its own."""
    return {**{key: value for key, value in FAST.items() if key in method.defaults}, **OWN.get(method.name, {})}


def solo_flags(method: str, inputs: dict[str, Path]) -> list[str]:
    """What each method's own run is given."""
    spec = METHODS[method]
    return method_flags({**method_inputs(spec, inputs), **own_values(spec)})


def group_flags(inputs: dict[str, Path]) -> list[str]:
    """The same values for every method at once: the plain teacher's inputs and the small values shared, each
    to every method that takes it; a value one method has apart (its own teacher, --kd.alpha) as --METHOD.FLAG."""
    plain = next(m for m in METHODS.values() if m.teacher == "plain")
    shared = {**method_inputs(plain, inputs), "heads_ckpt": str(inputs["heads"]), "ta": "res14",
              "ta_ckpt": str(inputs["ta"]), **FAST}
    flags = method_flags(shared)
    for spec in METHODS.values():
        apart = {flag: value for flag, value in {**method_inputs(spec, inputs), **OWN.get(spec.name, {})}.items()
                 if shared.get(flag) != value}
        flags += method_flags(apart, spec.name)
    return [*flags, "--dataset", str(inputs["npz"]), *COMMON]


@pytest.fixture(scope="module")
def solo(inputs, tmp_path_factory) -> Path:
    """Every method's own run, two epochs, into its default folder under a fresh working directory."""
    cwd = tmp_path_factory.mktemp("solo")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for method in EVERY:
            test_dih.main(["--method", method, *solo_flags(method, inputs), "--dataset", str(inputs["npz"]), *COMMON])
    return cwd / "runs" / "px16"


def assert_same(a: Any, b: Any, where: str, vary: tuple[str, ...] = VARY) -> None:
    """Equal values, tensors bit for bit, at any depth; the keys in `vary` aside."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if key not in vary:
                assert_same(a[key], b[key], f"{where}/{key}", vary)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]", vary)
    else:
        assert a == b, (where, a, b)


def assert_same_run(solo_dir: Path, group_dir: Path, vary: tuple[str, ...] = VARY) -> None:
    """Every file of the run's folder: weights, extras and resume state (optimizer, random streams) bit for bit,
    metadata, metrics and summary equal (the keys in `vary` aside)."""
    names = sorted(p.name for p in solo_dir.iterdir())
    assert names == sorted(p.name for p in group_dir.iterdir())
    for name in names:
        path_a, path_b = solo_dir / name, group_dir / name
        if name.endswith(".pt"):
            a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
        elif name == "metrics.jsonl":
            a, b = ([json.loads(line) for line in p.read_text().splitlines()] for p in (path_a, path_b))
        else:
            a, b = (json.loads(p.read_text()) for p in (path_a, path_b))
        assert_same(a, b, f"{group_dir.name}/{name}", vary)


def count_teacher_forwards(monkeypatch) -> list[tuple[set[int], Counter[int]]]:
    """Per batch of the group: the teachers its runs read (by id), and how often each network ran forward (a hook
    on its stem, which every pass through it runs, whoever calls it)."""
    batches: list[tuple[set[int], Counter[int]]] = []
    real_step = GroupStep.__call__

    def counted(self, runs, batch):
        read = {id(run.stage.shared_pass.teacher): run.stage.shared_pass.teacher for run in runs if run.phase.needs}
        forwards: Counter[int] = Counter()
        hooks = [teacher.stem.register_forward_hook(lambda *_, key=key: forwards.update([key]))
                 for key, teacher in read.items()]
        try:
            return real_step(self, runs, batch)
        finally:
            for hook in hooks:
                hook.remove()
            batches.append((set(read), forwards))

    monkeypatch.setattr(GroupStep, "__call__", counted)
    return batches


def test_every_method_in_one_group_command_is_bit_identical_to_its_own_run(inputs, solo, tmp_path, monkeypatch,
                                                                          capsys):
    """Every method in one command: each teacher network runs once per batch for all the students it teaches (the
    plain teacher's, TOFD's, TAKD's assistant), whatever their method; CE has none; every folder (name and files)
    is the solo run's."""
    monkeypatch.chdir(tmp_path)
    batches = count_teacher_forwards(monkeypatch)
    summaries = test_dih.main(["--method", *EVERY, *group_flags(inputs)])
    assert batches and all(forwards == Counter(read) for read, forwards in batches)  # once per batch, each
    teachers = {(m.teacher, m.assistant) for m in METHODS.values() if m.teacher != "none"}
    assert len(set().union(*(read for read, _ in batches))) == len(teachers)
    plain = " ".join(m.name for m in METHODS.values() if m.teacher == "plain" and not m.assistant)
    out = capsys.readouterr().out
    assert f"{len(METHODS)} students in {len(teachers) + 1} group(s)" in out
    assert f"  {plain} <- teacher res8 (" in out and "  takd <- assistant res14 (" in out
    assert "  tofd <- teacher res8 (" in out and "  ce: no teacher" in out
    assert [summaries[m]["alpha"] for m in ("kd", "dih", "at")] == [0.5, 0.1, 0.0]  # --kd.alpha for KD alone
    grouped = tmp_path / "runs" / "px16"
    assert sorted(p.name for p in grouped.iterdir()) == sorted(p.name for p in solo.iterdir())
    for folder in solo.iterdir():
        assert_same_run(folder, grouped / folder.name)


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import engine, test_dih

trace, kill_at, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
real_save, real_finish = engine.Run._save_progress, engine.Run.finish


def note(line):
    with open(trace, "a") as f:
        f.write(line + "\\n")


def save_progress(run):  # a run's checkpoint for its epoch is on disk: note it, and die here if told to
    real_save(run)
    note(f"{{run.name}} {{len(run.history)}}")
    if f"{{run.name}} {{len(run.history)}}" == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


def finish(run, data):
    note(f"{{run.name}} finish")
    return real_finish(run, data)


engine.Run._save_progress, engine.Run.finish = save_progress, finish
test_dih.main(argv)
"""


def run_killing(script: Path, trace: Path, kill_at: str, argv: list[str], cwd: Path) -> list[str]:
    """Run test_dih.py's main with `argv`, SIGKILLed right after the checkpoint `kill_at` ("kd 2": KD's, epoch 2)
    is written; the lines of the trace it left (each checkpoint written, each run finished)."""
    trace.write_text("")
    # The threads of this process, where the solo runs trained: the same sums, the same bits.
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads()), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(script), str(trace), kill_at, *argv], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == (-9 if kill_at else 0), result.stderr
    return trace.read_text().splitlines()


def test_a_group_killed_between_two_students_checkpoints_resumes_bit_identical_without_retraining(
        inputs, solo, tmp_path):
    """KD, FitNets (a hint epoch first: 3 epochs against 2) and CRD. Killed right after KD's epoch-2 checkpoint,
    before FitNets' and CRD's; then again at FitNets' last epoch, after KD and CRD had finished. Each resume trains
    only what was missing, the lagging students catching up first, and every folder ends as its solo run's."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=str(ROOT)))
    argv = ["--method", "kd", "fitnets", "crd", "--teacher", "res8", "--teacher_ckpt", str(inputs["teacher"]),
            "--kd.alpha", "0.5", "--hint_epochs", "1", "--nce_k", "16", "--dataset", str(inputs["npz"]), *COMMON]
    runs = tmp_path / "runs" / "px16"

    first = run_killing(script, tmp_path / "trace", "kd 2", argv, tmp_path)
    assert first == ["kd 1", "fitnets 1", "crd 1", "kd 2"]
    assert not any(runs.glob("*/summary.json"))
    second = run_killing(script, tmp_path / "trace", "fitnets 3", [*argv, "--resume"], tmp_path)
    # KD had all its epochs: only its final files; FitNets and CRD redo epoch 2, together; FitNets goes on alone.
    assert second == ["kd finish", "fitnets 2", "crd 2", "crd finish", "fitnets 3"]
    third = run_killing(script, tmp_path / "trace", "", [*argv, "--resume"], tmp_path)
    assert third == ["fitnets finish"]  # KD and CRD finished: not trained again
    assert sorted(p.name for p in runs.iterdir()) == sorted(p.name for p in solo.iterdir()
                                                            if p.name.split("-")[2] in ("kd", "fitnets", "crd"))
    for folder in runs.iterdir():  # (a resumed run records that it was resumed, as alone)
        assert_same_run(solo / folder.name, folder, (*VARY, "resume"))


@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "kd", "at", "--kd.beta", "1"], "--kd.beta makes no sense: kd takes --kd.teacher_ckpt, --kd.alpha, "
                                                 "--kd.temperature"),
    (["--method", "kd", "at", "--dih.alpha", "0.2"], "--dih.alpha: dih is not among --method kd at"),
    (["--method", "kd", "at", "--orth", "0.1"], "--orth makes no sense with --method kd at: none of them takes it"),
    (["--method", "ce", "kd", "--ta", "res20"], "--ta makes no sense with --method ce kd: none of them takes it"),
    (["--method", "kd", "--alpha", "0.1", "--kd.alpha", "0.5"], "--alpha applies to no method: --kd.alpha override it"),
    (["--method", "kd", "at", "--out_dir", "x"], "--out_dir names one folder for 2 students"),
    (["--method", "kd", "kd"], "--method names kd twice"),
    (["--method", "kd", "at", "--at.beta", "-1"], "--at.beta must be non-negative, got -1.0"),
    (["--method", "kd", "--orth", "0.1"], "--orth makes no sense with --method kd (it takes --teacher, "),
])
def test_ambiguous_or_invalid_per_method_flags_are_refused(flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        test_dih.main([*flags, "--gpu_id", "cpu", "--teacher_ckpt", "never-read.pt"])


def test_two_students_in_one_folder_are_refused_in_one_line(inputs, tmp_path):
    result = run_script("test_dih.py", "--method", "kd", "at", "--teacher", "res8", "--teacher_ckpt",
                        str(inputs["teacher"]), "--kd.out_dir", "same", "--at.out_dir", "same", "--dataset",
                        str(inputs["npz"]), "--gpu_id", "cpu", cwd=tmp_path)
    assert_clean_failure(result, "two students would write into", "same")
    assert not (tmp_path / "same").exists()


def test_missing_dih_heads_hold_back_no_other_student_of_the_group(inputs, tmp_path, monkeypatch, capsys):
    """A failed heads run holds back DIH alone: KD and AT train, DIH is reported as not trained in one line, and the
    command fails, naming it, once they are done."""
    monkeypatch.chdir(tmp_path)
    argv = ["--method", "kd", "dih", "at", "--teacher", "res8", "--teacher_ckpt", str(inputs["teacher"]),
            "--heads_ckpt", str(tmp_path / "heads" / "heads.pt"), "--dataset", str(inputs["npz"]), *COMMON]
    with pytest.raises(UserError, match="^dih not trained: its heads are missing .*; trained: kd, at$"):
        test_dih.main([*argv, "--epochs", "1"])
    assert "dih student res8: not trained: its heads " in capsys.readouterr().out
    runs = tmp_path / "runs" / "px16"
    assert sorted(p.parent.name.split("-")[2] for p in runs.glob("*/summary.json")) == ["at", "kd"]
    assert not any(runs.glob("*-dih-*"))  # its folder, made only to be locked, is gone again


def test_dih_heads_that_arrive_while_the_others_train_teach_it_afterwards(inputs, solo, tmp_path, monkeypatch):
    """Heads still training when the group starts (their file appears while KD trains): DIH trains after KD, alone,
    to the very weights of its own run."""
    import students

    monkeypatch.chdir(tmp_path)
    heads = tmp_path / "heads" / "heads.pt"
    real = students.fit_groups

    def then_the_heads_arrive(*args, **kwargs):
        summaries = real(*args, **kwargs)
        heads.parent.mkdir(exist_ok=True)
        heads.write_bytes(inputs["heads"].read_bytes())
        return summaries

    monkeypatch.setattr(students, "fit_groups", then_the_heads_arrive)
    summaries = test_dih.main(["--method", "kd", "dih", "--teacher", "res8", "--teacher_ckpt", str(inputs["teacher"]),
                               "--heads_ckpt", str(heads), "--kd.alpha", "0.5", "--dataset", str(inputs["npz"]),
                               *COMMON])
    assert list(summaries) == ["kd", "dih"]
    for method in summaries:
        folder = next(solo.glob(f"*-{method}-*")).name
        a, b = (torch.load(root / folder / "student.pt", weights_only=True)["state_dict"]
                for root in (solo, tmp_path / "runs" / "px16"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method


def test_a_sweeps_group_comes_after_dihs_heads_without_needing_them():
    """In a sweep's graph the group of a teacher run's students needs the teacher only; it comes after DIH's heads
    run (so that, finished, they teach DIH in the group) but is not skipped when that run fails."""
    import reproduce
    from sweep.graph import build_graph
    from sweep.grid import make_sweep

    sweep = make_sweep(reproduce.build_parser().parse_args(["--preset", "paper-cifar100", "--methods", "kd", "dih"]))
    groups = [node for node in build_graph(sweep) if len(node.runs) > 1]
    assert groups
    for node in groups:
        heads = Path(node.argv[node.argv.index("--heads_ckpt") + 1]).parent
        assert node.after == [heads] and heads not in node.deps
        teacher = node.argv[node.argv.index("--teacher") + 1]
        assert [dep.name.split("-seed")[0] for dep in node.deps] == [f"teacher-{teacher}"]
