"""`make gpu-check`: its runner survives a part that hangs, crashes or prints garbage, keeps every row as it comes,
imports nothing but torch and the standard library; the verdicts of the accuracy, concurrency and CUDA-test parts;
and without a GPU the whole check runs as a tiny CPU dry run."""

from __future__ import annotations

import ast
import collections
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, assert_clean_failure, run_script

import gpu_check
from gpu_check import RUNNER_S, Part
from gpu_parts.accuracy import ACCURACY_MARGIN, accuracy_verdict
from gpu_parts.common import Context, judged
from gpu_parts.concurrency import concurrency_verdict
from gpu_parts.cuda_tests import cuda_tests_verdict
from gpu_parts.smoke import GROUP, smoke_table
from methods import METHODS


def fake(name: str, code: str, cap_s: float = 30) -> Part:
    return Part(name, f"fake part {name}", cap_s, argv=("-c", code))


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "gpu_check.jsonl").read_text().splitlines()]


def test_a_hung_a_crashed_and_a_garbled_part_leave_the_report_whole(tmp_path):
    """The real runner over fake parts: one hangs past its cap, one crashes, one prints what is not JSON, one cannot
    even start; the good one after them finds its first row already on disk, in both report files, while it runs."""
    jsonl, md = tmp_path / "gpu_check.jsonl", tmp_path / "gpu_check.md"
    good = f"""
import json, pathlib, time
print('@row {{"n": 1, "ok": true}}', flush=True)
deadline = time.monotonic() + 20
while time.monotonic() < deadline and '"n": 1' not in pathlib.Path({str(jsonl)!r}).read_text():
    time.sleep(0.05)
seen = '"n": 1' in pathlib.Path({str(jsonl)!r}).read_text() and '| 1 |' in pathlib.Path({str(md)!r}).read_text()
print('@row ' + json.dumps({{"n": 2, "seen_while_running": seen}}), flush=True)
"""
    parts = [
        fake("hangs", "import time; print('@row {\"n\": 0}', flush=True); print('working...', flush=True); "
                      "time.sleep(600)", cap_s=3),
        fake("crashes", "print('@row {\"n\": 0}', flush=True); raise RuntimeError('boom: the part broke')"),
        fake("garbled", "print('@row {not json', flush=True); print('@row [1, 2]'); print('@row {\"n\": 0}')"),
        Part("unstartable", "fake part unstartable", 30, argv=("-c", None)),
        fake("good", good),
    ]
    ends = gpu_check.check(parts, tmp_path, budget_s=RUNNER_S + 120, gpu=True, gpu_id="0", command="fake")
    assert [end["status"] for end in ends] == ["timed out", "failed", "garbled", "error", "ok"]
    assert ends[0]["seconds"] < 10 and "killed at its cap of 3 s; the 1 row(s) it finished are kept" in ends[0]["note"]
    assert ends[0]["tail"][-1] == "working..."
    assert "exited with 1" in ends[1]["note"] and "RuntimeError: boom: the part broke" in ends[1]["tail"][-1]
    assert "2 result line(s) were not a JSON object, the first: '@row {not json'" in ends[2]["note"]
    assert "TypeError" in ends[3]["note"]

    saved = records(tmp_path)
    assert saved[0]["event"] == "start" and [p["name"] for p in saved[0]["parts"]] == [p.name for p in parts]
    rows = [(r["part"], r["row"]) for r in saved if "row" in r]
    assert rows == [("hangs", {"n": 0}), ("crashes", {"n": 0}), ("garbled", {"n": 0}), ("good", {"n": 1, "ok": True}),
                    ("good", {"n": 2, "seen_while_running": True})]
    assert [r["status"] for r in saved if "status" in r] == [end["status"] for end in ends]
    report = md.read_text()
    for part, status in zip(parts, ["timed out", "failed", "garbled", "error", "ok"], strict=True):
        assert f"| {part.title} | {status} |" in report
    assert "RuntimeError: boom: the part broke" in report and "| n | ok | seen_while_running |" in report


def test_parts_past_the_deadline_are_skipped(tmp_path):
    """The budget binds: a part that would start with under a second left is skipped, with a note."""
    parts = [fake("slow", "import time; time.sleep(1.5); print('@row {}')"), fake("late", "print('@row {}')")]
    ends = gpu_check.check(parts, tmp_path, budget_s=RUNNER_S + 2, gpu=True, gpu_id="0", command="fake")
    assert [end["status"] for end in ends] == ["ok", "skipped"] and ends[1]["note"] == "no time was left"


def test_the_runner_imports_nothing_but_torch_and_the_standard_library():
    """A torch/torchvision mismatch on the GPU box must fail a part, not the report: the project (cli, data, bench...)
    and torchvision are imported by the parts' own processes only. By construction (gpu_check.py's import statements
    name nothing else) and in fact (what importing it loads)."""
    imported = set()
    for node in ast.walk(ast.parse((ROOT / "gpu_check.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0] if not node.level else ".")
    assert imported - set(sys.stdlib_module_names) == {"torch"}, imported
    code = ("import sys, torch; before = set(sys.modules); import gpu_check; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "['gpu_check']", result.stderr


def test_the_budget_table_adds_up_to_seven_minutes():
    """The caps of every part but the last, the last part's own minimum, and the runner's share: 420 s."""
    assert sum(part.cap_s for part in gpu_check.PARTS) + RUNNER_S == gpu_check.BUDGET_S == 420
    assert [part.rest for part in gpu_check.PARTS] == [False] * (len(gpu_check.PARTS) - 1) + [True]


def test_the_smoke_table_runs_every_method_of_the_registry():
    """Built from METHODS: a method added there is smoke-tested without touching the table, each with the teacher
    (and heads, assistant) its record asks for."""
    smoke = {entry.name: entry for entry in smoke_table(ROOT)}
    assert set(smoke) == {"teacher", "tofd_teacher", "heads", *METHODS, "group"}
    for name, method in METHODS.items():
        argv = smoke[name].argv
        assert argv[argv.index("--method") + 1] == name
        assert ("--teacher_ckpt" in argv) == (method.teacher != "none"), name
        assert ("tofd_teacher" in smoke[name].needs) == (method.teacher == "tofd"), name
        assert ("--heads_ckpt" in argv) == method.heads and ("--ta_ckpt" in argv) == method.assistant, name
    group = smoke["group"]  # several students in one process, each its folder
    assert group.group == GROUP and group.argv[group.argv.index("--method") + 1:][:len(GROUP)] == list(GROUP)
    assert group.out_flags(ROOT)[::2] == [f"--{method}.out_dir" for method in GROUP]


@pytest.mark.parametrize(("bf16", "fp32", "ok", "note"), [
    ([89.1, 90.6, 87.6], [88.7, 91.6, 89.6], True, "the means differ by -0.87 points"),
    ([85.0, 86.0, 87.0], [89.0, 90.0, 88.0], False, "the means differ by -3.00 points, more than 2.0"),
    ([91.0, 92.0, 93.0], [88.0, 89.0, 90.0], False, "+3.00 points"),  # a gap either way is a finding
    ([10.0, 10.0, 10.0], [10.0, 10.0, 10.0], False, "fp32 reached 10.00%: it did not learn"),
    ([89.0, 90.0], [89.0, 90.0, 91.0], False, "2 bf16 and 3 fp32 runs of 3 each finished"),
])
def test_the_accuracy_verdict_holds_bf16_within_its_margin_of_fp32(bf16, fp32, ok, note):
    verdict = accuracy_verdict(bf16, fp32, seeds=3)
    assert verdict["ok"] is ok and note in verdict["note"] and verdict["margin"] == ACCURACY_MARGIN == 2.0


@pytest.mark.parametrize(("aggregates", "ok", "note"), [
    ({1: 1000.0, 2: 1900.0, 4: 3100.0, 8: 2950.0}, True, "--jobs 4 gives the most images/s"),
    ({1: 1000.0, 2: 980.0, 4: 950.0, 8: 930.0}, True, "--jobs 1 gives the most images/s"),  # within the noise
    ({1: 1000.0, 2: 1500.0, 4: 800.0, 8: 400.0}, False, "8 processes at once give 0.40x one process's images/s"),
    ({1: 1000.0, 2: 1500.0}, False, "levels 4, 8 did not finish"),
])
def test_the_concurrency_verdict_fails_a_level_that_loses_throughput(aggregates, ok, note):
    verdict = concurrency_verdict(aggregates, (1, 2, 4, 8))
    assert verdict["ok"] is ok and verdict["note"] == note


@pytest.mark.parametrize(("code", "outcomes", "on_gpu", "ok", "note"), [
    (0, {"passed": 40, "skipped": 2}, True, True, "40 passed, 2 skipped"),
    (0, {"skipped": 42}, True, False, "all 42 skipped: none ran on the GPU"),
    (1, {"passed": 40, "failed": 1}, True, False, "1 failed"),
    (5, {}, True, False, "no CUDA test was collected"),
    (0, {"skipped": 42}, False, True, "0 passed, 42 skipped"),  # the CPU dry run: skipping is right there
    (5, {}, False, False, "no CUDA test was collected"),
])
def test_the_cuda_tests_verdict_needs_tests_that_ran(code, outcomes, on_gpu, ok, note):
    verdict = cuda_tests_verdict(code, collections.Counter(outcomes), on_gpu)
    assert verdict["ok"] is ok and note in verdict["note"]


def test_a_dry_run_shows_a_verdict_without_judging_it(tmp_path):
    verdict = accuracy_verdict([10.0], [90.0], seeds=1)
    assert judged(Context("0", tmp_path, dry=False), verdict) == verdict
    shown = judged(Context("cpu", tmp_path, dry=True), verdict)
    assert "ok" not in shown and shown["note"].startswith("CPU dry run, not judged (would be not ok): the means")


def test_bad_flags_are_one_line(tmp_path):
    assert_clean_failure(run_script("gpu_check.py", "--parts", "bench,nope", "--out_dir", str(tmp_path)),
                         "unknown part 'bench'")
    assert_clean_failure(run_script("gpu_check.py", "--budget_s", "10", "--out_dir", str(tmp_path)), "--budget_s")


def test_every_part_gets_the_gpu_asked_for(tmp_path, monkeypatch):
    """--gpu_id 1 reaches every part's process: as its flag (the stage scripts and bench.py make it current), and as
    DIH_TEST_DEVICE, where the CUDA tests take their device from."""
    started = []

    def run_part(argv, cap_s, env, on_row):
        started.append((argv, env["DIH_TEST_DEVICE"]))
        return {"status": "ok", "seconds": 0, "rows": 0, "note": "", "tail": []}

    monkeypatch.setattr(gpu_check, "run_part", run_part)
    gpu_check.check(gpu_check.PARTS, tmp_path, budget_s=gpu_check.BUDGET_S, gpu=True, gpu_id="1", command="x")
    assert len(started) == len(gpu_check.PARTS)
    for argv, device in started:
        assert argv[argv.index("--gpu_id") + 1] == "1" and "--dry" not in argv and device == "cuda:1"


def test_make_gpu_check_without_a_gpu_is_a_dry_run(tmp_path):
    """Every part, tiny, on the CPU: every smoke command line of the GPU run, eager; bench.py's loss check; the
    concurrent students; bf16 and fp32; the CUDA tests collected and skipped. The report says it is no GPU run."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path), "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["make", "--no-print-directory", "gpu-check", f"GPU_PY={sys.executable}"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[1].startswith("gpu_check: no CUDA GPU is visible"), result.stdout
    saved = records(tmp_path)
    assert saved[0]["dry_run"]
    ends = {r["part"]: r for r in saved if "status" in r}
    assert {name: end["status"] for name, end in ends.items()} == {part.name: "ok" for part in gpu_check.PARTS}, ends
    rows = {}
    for record in saved:
        if "row" in record:
            rows.setdefault(record["part"], []).append(record["row"])
    smoke = [row for row in rows["smoke"] if "entry" in row]
    assert {row["entry"] for row in smoke} == {entry.name for entry in smoke_table(ROOT)}
    assert all(row["ok"] and row["compile"] == "off" for row in smoke)
    assert all(row["loss_check"]["ok"] for row in rows["bench_dih"] + rows["bench_teacher"])
    assert [row["stage"] for row in rows["bench_teacher"]] == ["teacher", "heads"]
    assert [row["processes"] for row in rows["concurrency"] if "processes" in row] == [1, 2]
    assert {row["amp"] for row in rows["accuracy"] if "final_test_acc" in row} == {"on", "off"}
    for part in ("concurrency", "accuracy"):  # shown, not judged
        assert rows[part][-1]["verdict"] and rows[part][-1]["note"].startswith("CPU dry run, not judged"), part
    tests = [row for row in rows["cuda_tests"] if "test" in row]
    assert len(tests) > 10 and all(row["outcome"] == "skipped" for row in tests)
    assert rows["cuda_tests"][-1]["ok"] and rows["cuda_tests"][-1]["skipped"] == len(tests)
    report = (tmp_path / "gpu_check.md").read_text()
    assert "CPU dry run, no GPU" in report and "| entry | compile | ok |" in report
