"""reproduce.py: the sweep's dependency graph on tiny runs, the aggregate, the dry run, bad input."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_clean_failure, run_script

import reproduce
from sweep import local as sweep_local
from sweep.graph import Node, build_graph, is_finished
from sweep.grid import PAPER_METHODS, Sweep, grid_flags, make_sweep
from sweep.local import exclusive, execute
from sweep.report import aggregate, report
from utils import UserError


def tiny_sweep(npz: Path, tmp: Path, *extra: str) -> list[str]:
    return ["--dataset", str(npz), "--teachers", "res8", "--students", "res8", "--seeds", "30", "--epochs", "1",
            "--runs_dir", str(tmp / "runs"), "--results_dir", str(tmp / "results"), *extra]


def sweep_of(argv: list[str]) -> Sweep:
    return make_sweep(reproduce.build_parser().parse_args(argv))


def test_graph_trains_a_shared_teacher_once_and_reruns_only_what_is_missing(tiny_npz, tmp_path):
    argv = tiny_sweep(tiny_npz, tmp_path, "--methods", "ce", "kd", "dih")
    first = reproduce.main(argv)
    labels = [node.label for node in first.launched]
    assert not first.failed and not first.skipped
    assert labels == ["teacher res8 seed 30", "heads res8 seed 30", "ce student res8 seed 30",
                      "kd dih students res8 <- res8 seed 30"]  # one process for the students of the teacher
    teacher_dir = tmp_path / "runs" / "tiny" / "teacher-res8-seed30"
    assert (teacher_dir / "log.txt").read_text().count("stage 1:") == 1  # one process trained it, for both students
    assert len((teacher_dir / "metrics.jsonl").read_text().splitlines()) == 1
    out = tmp_path / "results" / "custom"
    assert {"results.md", "results.csv", "curves.png", "bars.png", "gap.png"} <= {p.name for p in out.iterdir()}
    assert "| res8 | res8 |" in first.table

    started = time.perf_counter()
    second = reproduce.main(argv)
    assert second.launched == [] and time.perf_counter() - started < 20
    assert second.table == first.table

    kd_dir = tmp_path / "runs" / "tiny" / "student-res8-kd-res8-a0.1-t5-seed30"
    dih_weights = tmp_path / "runs" / "tiny" / "student-res8-dih-res8-a0.1-t5-seed30" / "student.pt"
    written = dih_weights.stat().st_mtime_ns
    (kd_dir / "summary.json").unlink()
    third = reproduce.main(argv)
    (group,) = third.launched  # the node of the unfinished run: its group
    assert kd_dir in group.runs and not third.failed
    assert (kd_dir / "summary.json").exists()
    assert dih_weights.stat().st_mtime_ns == written  # a finished student of the group is not trained again
    assert f"{dih_weights.parent} is already finished" in (group.out_dir / "log.txt").read_text()

    # --no_group: one process per student, the same folders, weights and table.
    grouped = {run: torch.load(run / "student.pt", weights_only=True)["state_dict"] for run in group.runs}
    for run in group.runs:
        shutil.rmtree(run)
    fourth = reproduce.main([*argv, "--no_group"])
    assert [node.label for node in fourth.launched] == ["kd student res8 <- res8 seed 30",
                                                        "dih student res8 <- res8 seed 30"]
    assert all(len(node.runs) == 1 for node in fourth.nodes) and fourth.table == first.table
    for run, weights in grouped.items():
        alone = torch.load(run / "student.pt", weights_only=True)["state_dict"]
        assert weights.keys() == alone.keys() and all(torch.equal(weights[k], alone[k]) for k in weights), run


def test_every_method_of_the_comparison_runs_through_the_sweep(tmp_path):
    """Each baseline joins the grid: TOFD's teacher and TAKD's assistant are nodes of their own; every column
    gets a value. (96 images: one or two steps an epoch, since MHKD's heads are slow on a CPU.)"""
    from data import make_synthetic, save_npz

    save_npz(tmp_path / "tiny.npz", *make_synthetic(96, 48, seed=0))
    argv = tiny_sweep(tmp_path / "tiny.npz", tmp_path, "--teachers", "res20", "--hint_epochs", "1")
    outcome = reproduce.main([*argv, "--jobs", "2"])
    assert not outcome.failed and not outcome.skipped
    labels = [node.label for node in outcome.launched]
    shared = ["teacher res20 seed 30", "TOFD teacher res20 seed 30", "heads res20 seed 30",
              "kd student res14 <- res20 seed 30"]  # the last: TAKD's assistant
    own = ["ce student res8 seed 30", "takd student res8 <- res20 seed 30", "tofd student res8 <- res20 seed 30",
           "kd fitnets at crd mhkd dih students res8 <- res20 seed 30"]  # the others: one group on the teacher run
    assert sorted(labels) == sorted(shared + own)
    assert sum(len(node.runs) for node in outcome.launched) == len(shared) + len(PAPER_METHODS)
    rows = aggregate(sweep_of(argv))
    for method in PAPER_METHODS:
        column = {"fitnets": "FitNets"}.get(method, method.upper())
        assert rows[0][column].n == 1, column
    takd = json.loads((tmp_path / "runs" / "tiny" / "student-res8-takd-res20-ta-res14-a0.1-t5-seed30"
                       / "summary.json").read_text())
    assert takd["ta"] == "res14"
    assert (tmp_path / "results" / "custom" / "gap.png").stat().st_size > 0


def test_paper_preset_lists_every_method_for_its_teachers():
    result = run_script("reproduce.py", "--preset", "paper-cifar100", "--dry_run")
    assert result.returncode == 0, result.stderr
    methods = [(s, m) for s, names in re.findall(r"--student (\S+) --method ((?:[a-z]+ )+)--", result.stdout)
               for m in names.split()]
    count = {method: sum(1 for s, m in methods if m == method and s == "res8") for method in PAPER_METHODS}
    teachers, seeds = 9, 3
    assert count.pop("ce") == seeds  # one CE run per seed serves every teacher's row
    assert count.pop("takd") == (teachers - 1) * seeds  # no assistant is defined for res14
    assert set(count.values()) == {teachers * seeds}
    assistants = [s for s, m in methods if s != "res8"]
    assert assistants == ["res14"] * seeds + ["res20"] * (teachers - 2) * seeds
    assert result.stdout.count(" --tofd ") == teachers * seeds  # TOFD's own teachers


@pytest.mark.parametrize(("group", "skipped"), [
    (False, ["dih student res8 <- res8 seed 30"]),  # KD, which needs no heads, runs
    (True, []),  # the group comes after the heads, failed or not: KD trains, DIH says its heads are missing
])
def test_a_failed_run_skips_its_dependents_and_the_others_go_on(tiny_npz, tmp_path, group, skipped):
    sweep = sweep_of(tiny_sweep(tiny_npz, tmp_path, "--methods", "ce", "kd", "dih"))
    nodes = build_graph(sweep, group=group)
    heads = next(node for node in nodes if node.label.startswith("heads"))
    heads.argv = [sys.executable, "-c", "import sys; sys.exit('heads broke')"]
    for node in nodes:  # everything but the graph's bookkeeping is faked: no training here
        if node is not heads:
            writes = "; ".join(f"open({str(run / 'summary.json')!r}, 'w').write(json.dumps({{'final_test_acc': 1.0}}))"
                               for run in node.runs)
            node.argv = [sys.executable, "-c", f"import json; {writes}"]
            for run in node.runs:
                run.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    outcome = execute(nodes, sweep.dataset, 2, [None], log=lines.append)
    assert outcome.failed == [heads]
    assert [node.label for node in outcome.skipped] == skipped
    assert len(outcome.launched) == len(nodes) - len(skipped)  # all but the skipped ones
    failure = next(i for i, line in enumerate(lines) if line.startswith("FAILED"))
    assert shlex.join(heads.argv) in lines[failure] and "heads broke" in lines[failure + 1]
    if group:  # two slots, yet the group waited for the heads run to end (Node.after), so DIH could have used them
        assert failure < next(i for i, line in enumerate(lines) if line.startswith("start  kd dih students"))


def write_run(out_dir: Path, accs: list[float], **summary) -> None:
    """A fake finished run: metrics.jsonl with these test accuracies by epoch and the matching summary."""
    out_dir.mkdir(parents=True)
    out_dir.joinpath("metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "test_acc": a}) + "\n"
                                                         for i, a in enumerate(accs)))
    summary = {"final_test_acc": accs[-1], "best_test_acc": max(accs), **summary}
    out_dir.joinpath("summary.json").write_text(json.dumps(summary))


def test_the_aggregate_is_the_mean_and_sample_std_over_seeds(tmp_path):
    argv = ["--dataset", "synthetic", "--teachers", "res20", "--seeds", "30", "50", "67",
            "--runs_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results")]
    sweep = sweep_of(argv)
    teacher, ce, kd = [70.0, 72.5, 71.0], [50.0, 54.0, 53.0], [55.0, 56.5, 60.25]
    for i, seed in enumerate(sweep.seeds):
        write_run(sweep.teacher_dir("res20", seed), [60.0, teacher[i]])
        write_run(sweep.heads_dir("res20", seed), [40.0, 41.0],
                  heads=[{"tap": "layer1", "final_test_acc": 30.0 + i}, {"tap": "layer3", "final_test_acc": 65.0}])
        write_run(sweep.student_dir("res8", "ce", "res20", seed), [52.0, ce[i]])
        write_run(sweep.student_dir("res8", "kd", "res20", seed), [58.0, kd[i]])
    write_run(sweep.student_dir("res8", "dih", "res20", 50), [61.0, 57.0])  # one seed of three

    table = report(sweep)
    (row,) = aggregate(sweep)
    assert row["teacher acc"].mean == statistics.mean(teacher) and row["teacher acc"].std == statistics.stdev(teacher)
    assert row["CE"].mean == statistics.mean(ce) and row["CE"].std == pytest.approx(statistics.stdev(ce))
    # By hand: mean 57.25, deviations -2.25, -0.75, 3; sqrt((5.0625 + 0.5625 + 9) / (3 - 1)) = 2.7042
    assert row["KD"].values == tuple(kd) and row["KD"].std == pytest.approx(2.7042, abs=1e-4)
    assert row["DIH"].values == (57.0,) and row["DIH"].std is None
    assert row["head layer1"].mean == 31.0 and row["head layer3"].n == 3
    assert row["KD best epoch"].values == (58.0, 58.0, 60.25)  # the best epoch, never the headline

    assert f"| {statistics.mean(kd):.2f} ± {statistics.stdev(kd):.2f} (n=3) |" in table
    assert "| 57.00 (n=1) |" in table and "| 61.00 (n=1) |" in table
    out = sweep.results_dir / "custom"
    assert (out / "results.md").read_text() == table
    (csv_row,) = csv.DictReader((out / "results.csv").open())
    assert float(csv_row["KD mean"]) == pytest.approx(statistics.mean(kd)) and csv_row["KD n"] == "3"
    assert csv_row["DIH std"] == "" and csv_row["DIH n"] == "1"
    assert (out / "curves.png").stat().st_size > 0 and (out / "bars.png").stat().st_size > 0


def test_missing_runs_show_as_a_dash(tmp_path):
    argv = ["--teachers", "res20", "--runs_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "res")]
    sweep = sweep_of(argv)
    assert "| res20 | res8 | — | — | — | — |" in report(sweep)


def test_report_only_tabulates_a_half_done_sweep_and_runs_nothing(tmp_path, capsys):
    argv = ["--teachers", "res20", "--methods", "ce", "kd", "dih", "--seeds", "30", "50",
            "--runs_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "res")]
    teacher = build_graph(sweep_of(argv))[0]
    write_run(teacher.out_dir, [60.0, 70.0], **teacher.runs[teacher.out_dir], dataset="cifar100")
    outcome = reproduce.main([*argv, "--report_only"])
    assert outcome.launched == [] and "1 of 10 stage runs have finished" in capsys.readouterr().out
    assert "| res20 | res8 | 70.00 (n=1) | — | — | — |" in outcome.table
    assert (tmp_path / "res" / "custom" / "results.md").read_text() == outcome.table


def test_a_folder_holding_another_run_is_refused(tmp_path):
    argv = ["--teachers", "res20", "--epochs", "5", "--runs_dir", str(tmp_path)]
    sweep = sweep_of(argv)
    teacher = build_graph(sweep)[0]
    write_run(teacher.out_dir, [10.0], **teacher.runs[teacher.out_dir], dataset="cifar100")
    assert is_finished(teacher, "cifar100")
    teacher.out_dir.joinpath("summary.json").write_text(json.dumps({**teacher.runs[teacher.out_dir], "epochs": 3,
                                                                    "dataset": "cifar100"}))
    with pytest.raises(UserError, match="epochs=3, this sweep asks for 5"):
        is_finished(teacher, "cifar100")


@pytest.mark.parametrize("group", [True, False])
def test_dry_run_of_paper_cifar100_lists_every_stage_command_by_level_with_what_it_waits_for(capsys, group):
    reproduce.main(["--preset", "paper-cifar100", "--methods", "ce", "kd", "dih", "--dry_run",
                    *([] if group else ["--no_group"])])
    levels: list[list[tuple[list[str], list[str]]]] = []
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("# level"):
            levels.append([])
        else:
            levels[-1].append((shlex.split(line, comments=True), line.partition("  # after ")[2].split()))

    teachers = ["res14", "res20", "res32", "res56", "res110", "res18", "res34", "vgg11", "wrn_28_2"]
    seeds = [30, 50, 67]

    def command(script: str, *flags: str, seed: int, out: str | None = None, outs: dict | None = None) -> list[str]:
        folders = ["--out_dir", f"runs/cifar100/{out}-seed{seed}"] if out else [
            flag for method, name in outs.items()
            for flag in (f"--{method}.out_dir", f"runs/cifar100/{name}-seed{seed}")]
        return [sys.executable, str(ROOT / script), *flags, "--dataset", "cifar100", "--data_dir", "./data",
                "--seed", str(seed), "--epochs", "200", "--batch_size", "64", "--lr", "0.1", "--momentum", "0.9",
                "--wd", "0.0005", "--nesterov", "--schedule", "60", "120", "180", "--gamma", "0.1", *folders,
                "--resume"]

    def ckpts(t: str, seed: int) -> list[str]:
        return ["--teacher", t, "--teacher_ckpt", f"runs/cifar100/teacher-{t}-seed{seed}/teacher.pt"]

    first = [(command("train_teacher.py", "--model", t, seed=s, out=f"teacher-{t}"), [])
             for t in teachers for s in seeds]
    first += [(command("test_dih.py", "--student", "res8", "--method", "ce", seed=s, out="student-res8-ce"), [])
              for s in seeds]
    second = [(command("train_heads.py", *ckpts(t, s), seed=s, out=f"heads-{t}"), [f"teacher-{t}-seed{s}"])
              for t in teachers for s in seeds]
    second += [(command("test_dih.py", "--student", "res8", "--method", "kd", *ckpts(t, s), "--alpha", "0.1",
                        "--temperature", "5.0", seed=s, out=f"student-res8-kd-{t}-a0.1-t5"), [f"teacher-{t}-seed{s}"])
               for t in teachers for s in seeds]
    third = [(command("test_dih.py", "--student", "res8", "--method", "dih", *ckpts(t, s), "--heads_ckpt",
                      f"runs/cifar100/heads-{t}-seed{s}/heads.pt", "--alpha", "0.1", "--temperature", "5.0",
                      "--cohort_reduction", "sum", seed=s, out=f"student-res8-dih-{t}-a0.1-t5"),
              [f"teacher-{t}-seed{s}", f"heads-{t}-seed{s}"])
             for t in teachers for s in seeds]
    assert len(first) + len(second) + len(third) == 9 * 3 + 9 * 3 + (9 * 2 + 1) * 3 == 111
    if not group:
        assert levels == [first, second, third]
        return
    # The KD and DIH students of each teacher run: one process, after the teacher and the heads.
    groups = [(command("test_dih.py", "--student", "res8", "--method", "kd", "dih", *ckpts(t, s), "--heads_ckpt",
                       f"runs/cifar100/heads-{t}-seed{s}/heads.pt", "--kd.alpha", "0.1", "--kd.temperature", "5.0",
                       "--dih.alpha", "0.1", "--dih.temperature", "5.0", "--dih.cohort_reduction", "sum", seed=s,
                       outs={"kd": f"student-res8-kd-{t}-a0.1-t5", "dih": f"student-res8-dih-{t}-a0.1-t5"}),
               [f"teacher-{t}-seed{s}", f"heads-{t}-seed{s}"])
              for t in teachers for s in seeds]
    assert levels == [first, second[:27], groups]


def test_a_data_mirror_reaches_every_stage_run_and_survives_the_round_trip():
    argv = ["--preset", "paper-tinyimagenet", "--data_url", "file:///mirror/tiny-imagenet-200.zip"]
    sweep = sweep_of(argv)
    nodes = build_graph(sweep)
    assert all(node.argv[node.argv.index("--data_url") + 1] == sweep.data_url for node in nodes)
    assert sweep_of(grid_flags(sweep)) == sweep  # the Slurm report job rebuilds the same sweep


def test_flags_override_the_preset_and_ce_is_shared_by_every_teacher():
    argv = ["--preset", "paper-cifar10", "--teachers", "res20", "res56", "--seeds", "1", "--epochs", "3",
            "--methods", "dih", "ce", "kd"]
    sweep = sweep_of(argv)
    assert (sweep.dataset, sweep.epochs, sweep.teacher_epochs, sweep.lr) == ("cifar10", 3, 3, 0.1)
    students = [node for node in build_graph(sweep) if "student" in node.label]
    assert [node.label for node in students] == [
        "ce student res8 seed 1", "kd dih students res8 <- res20 seed 1", "kd dih students res8 <- res56 seed 1"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--preset", "demo", "--teachers", "res9000"], "unknown model 'res9000'"),
    (["--dataset", "synthetic"], "the grid is empty"),
    (["--preset", "demo", "--gpus", "0,,1"], "--gpus"),
    (["--preset", "demo", "--gpus", "99"], "names GPU 99"),
    (["--preset", "demo", "--jobs", "0"], "--jobs must be at least 1"),
    (["--preset", "demo", "--alpha", "2"], "--alpha must be in [0, 1]"),
    # Flags for no method of the grid are refused, as --partition is without --slurm.
    (["--preset", "demo", "--methods", "ce", "kd", "--hint_epochs", "3"],
     "--hint_epochs applies to no method of this grid (only to fitnets; the grid has ce kd): drop it"),
    (["--teachers", "res20", "--methods", "ce", "at", "--alpha", "0.5"], "--alpha applies to no method of this grid"),
    (["--teachers", "res20", "--methods", "crd", "--temperature", "2"], "--temperature applies to no method"),
    (["--teachers", "res20", "--methods", "kd", "--heads_epochs", "2"], "--heads_epochs applies to no method"),
    (["--preset", "demo", "--data_url", "file:///x.tgz"], "--data_url is a mirror of a downloaded dataset's archive"),
    (["--teachers", "res14", "--methods", "takd"], "the grid is empty: no takd row for teacher res14: takd distils "
                                                   "through a teacher assistant smaller than the teacher"),
])
def test_bad_input_is_a_user_error(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        reproduce.main([*argv, "--dry_run"])


def test_bad_input_is_one_line_on_stderr():
    assert_clean_failure(run_script("reproduce.py", "--preset", "nope"), "invalid choice", "nope")
    result = run_script("reproduce.py", "--teachers", "res9000", "--dry_run")
    assert result.returncode == 2
    assert_clean_failure(result, "unknown model 'res9000'", "res110")


def test_a_second_sweep_on_the_same_runs_is_refused(tmp_path):
    from data import dataset_tag
    from sweep.grid import PRESETS

    with exclusive(tmp_path / dataset_tag(PRESETS["demo"]["dataset"])), pytest.raises(UserError,
                                                                                     match="another reproduce.py"):
        reproduce.main(["--preset", "demo", "--runs_dir", str(tmp_path)])


def test_rows_that_cannot_exist_are_named(capsys):
    outcome = reproduce.main(["--teachers", "res14", "res20", "--methods", "takd", "--seeds", "30", "--dry_run"])
    assert capsys.readouterr().err == ("note: no takd row for teacher res14: takd distils through a teacher assistant "
                                       "smaller than the teacher, and none is defined for res14\n")
    assert [node.label for node in outcome.nodes if node.label.startswith("takd")] == [
        "takd student res8 <- res20 seed 30"]


def test_flags_of_the_report_job_apply_to_its_grid():
    """The report job gets only flags its grid takes: --heads_epochs, always set, only where DIH is."""
    sweep = sweep_of(["--teachers", "res20", "--methods", "kd", "ce", "--epochs", "3"])
    assert "--heads_epochs" not in grid_flags(sweep) and sweep_of(grid_flags(sweep)) == sweep


def test_a_finished_run_on_an_npz_is_recognised_by_the_file_content(tmp_path):
    """A regenerated npz of the same name is another dataset: its old runs are not taken as finished."""
    from data import make_synthetic, npz_name, save_npz

    npz = tmp_path / "set.npz"
    save_npz(npz, *make_synthetic(32, 16, seed=0))
    sweep = sweep_of(["--dataset", str(npz), "--teachers", "res20", "--runs_dir", str(tmp_path / "runs")])
    teacher = build_graph(sweep)[0]
    write_run(teacher.out_dir, [10.0], **teacher.runs[teacher.out_dir], dataset=npz_name(npz))
    assert is_finished(teacher, sweep.dataset)
    save_npz(npz, *make_synthetic(32, 16, seed=1))  # regenerated in place
    with pytest.raises(UserError, match="holds another run \\(dataset='npz:set:[0-9a-f]{12}', this sweep asks for"):
        is_finished(teacher, sweep.dataset)


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is `pid`, from /proc (zombies, which have ended, left out)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
    return found


def is_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_killed_sweep_leaves_no_stage_run_behind(tiny_npz, tmp_path):
    """SIGKILL gives reproduce.py no chance to stop its runs: the kernel does, on its death (PR_SET_PDEATHSIG).
    The teacher is given epochs enough to outlive the check by far, were it left running."""
    argv = tiny_sweep(tiny_npz, tmp_path, "--methods", "ce", "--epochs", "500")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen([sys.executable, str(ROOT / "reproduce.py"), *argv], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not stage and sweep.poll() is None and time.monotonic() < deadline:
            stage = children_of(sweep.pid)
            time.sleep(0.05)
        assert stage, "no stage run started"
        time.sleep(1)  # well into its start-up
        sweep.kill()
        sweep.wait()
        deadline = time.monotonic() + 10
        while is_alive(stage[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_alive(stage[0]), "the stage run outlived the sweep"
    finally:
        for pid in stage:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()


def test_the_demo_runs_two_processes_at_a_time_unless_told_otherwise(tmp_path, monkeypatch):
    """The demo preset's own --jobs (2: one thread each on two cores), which the flag overrides."""
    from sweep.graph import Outcome

    jobs: list[int] = []
    monkeypatch.setattr(reproduce, "execute", lambda nodes, dataset, n, gpus, **_: jobs.append(n) or Outcome(nodes))
    monkeypatch.setattr(reproduce, "report", lambda sweep: "")
    where = ["--runs_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results")]
    for extra in ([], ["--jobs", "1"]):
        reproduce.main(["--preset", "demo", *where, *extra])
    reproduce.main(["--teachers", "res8", "--dataset", "synthetic", *where])
    assert jobs == [2, 1, 1]


def test_a_run_on_several_gpus_is_a_torchrun_command_on_its_group_of_gpus(tmp_path, monkeypatch):
    started = []

    class Recorded:
        def __init__(self, argv, env, **kwargs):
            started.append((argv, env))

    monkeypatch.setattr(sweep_local.subprocess, "Popen", Recorded)
    monkeypatch.setattr(sweep_local, "terminate_with_parent", lambda: None)  # its libc lookup runs processes too
    node = Node("teacher", tmp_path / "run", [sys.executable, "train_teacher.py", "--resume"], [], {})
    sweep_local.launch(node, "2,3", {"PATH": "/bin"}, processes=2)
    sweep_local.launch(node, "1", {"PATH": "/bin"})
    (many, many_env), (one, one_env) = started
    assert many == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "train_teacher.py", "--resume"] and many_env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert one == [sys.executable, "train_teacher.py", "--resume", "--gpu_id", "1"]
    assert "CUDA_VISIBLE_DEVICES" not in one_env
    assert sweep_local.gpu_groups(["0", "1", "2", "3"], 2, 2) == ["0,1", "2,3"]
    assert sweep_local.gpu_groups([None], 2, 1) == [None]
    for gpus, jobs, message in ((["0", "1", "2"], 1, "3 GPUs do not make groups of --gpus_per_run 2"),
                                ([None], 2, "list the GPUs to spread them over with --gpus")):
        with pytest.raises(UserError, match=message):
            sweep_local.gpu_groups(gpus, 2, jobs)


def test_runs_of_several_processes_take_sync_bn(capsys):
    outcome = reproduce.main(["--preset", "demo", "--gpus_per_run", "2", "--jobs", "1", "--dry_run"])
    assert all(node.argv[-1] == "--sync_bn" for node in outcome.nodes)
    assert all("--sync_bn" not in node.argv for node in reproduce.main(["--preset", "demo", "--dry_run"]).nodes)
