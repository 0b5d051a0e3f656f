"""`make gpu-check` without a GPU: one line says so, the parts that need none run as a tiny CPU dry run, the
report is written, exit 0. And its deadline: a part that no longer fits is skipped with a note."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, assert_clean_failure, run_script

import gpu_check


def test_make_gpu_check_without_a_gpu_is_a_dry_run(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path), "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["make", "--no-print-directory", "gpu-check", f"GPU_PY={sys.executable}"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("gpu_check: no CUDA GPU is visible"), lines  # after make's echo of the command
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"]
    status = {part["name"]: part["status"] for part in report["parts"]}
    assert status == {"environment": "ok", "cuda_tests": "ok", "bench_dih": "ok", "compile_modes": "skipped",
                      "concurrency": "ok", "growth": "skipped", "bench_teacher_heads": "skipped",
                      "accuracy": "skipped"}
    parts = {part["name"]: part for part in report["parts"]}
    tests = parts["cuda_tests"]["data"]
    assert tests["tests"] == tests["skipped"] > 10 and not tests["failed"]
    assert parts["bench_dih"]["data"]["loss_check"]["ok"]
    assert [row["processes"] for row in parts["concurrency"]["data"]["rows"]] == [1, 2]
    assert all(row["aggregate_img_s"] > 0 for row in parts["concurrency"]["data"]["rows"])
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "CPU dry run" in markdown and "| processes | aggregate img/s" in markdown
    assert "## DIH stage: --compile modes\n\nskipped: needs a GPU" in markdown


def test_parts_that_no_longer_fit_are_skipped_with_a_note(tmp_path):
    assert gpu_check.main(["--budget_s", "5", "--parts", "environment,bench_dih", "--out_dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [part["status"] for part in report["parts"]] == ["skipped", "skipped"]
    assert "run it with --parts bench_dih" in report["parts"][1]["note"]
    assert "run it with --parts bench_dih" in (tmp_path / "gpu_check.md").read_text()


def test_bad_flags_are_one_line(tmp_path):
    assert_clean_failure(run_script("gpu_check.py", "--parts", "bench,nope", "--out_dir", str(tmp_path)),
                         "unknown part 'bench'")
    assert_clean_failure(run_script("gpu_check.py", "--budget_s", "0", "--out_dir", str(tmp_path)), "--budget_s")


def test_a_late_part_is_killed_and_a_failed_one_reported_with_its_output():
    late = gpu_check.start(["-c", "import time; print('started', flush=True); time.sleep(60)"])
    with pytest.raises(gpu_check.PartTimedOut, match="still running after 2 s; killed:\nstarted"):
        gpu_check.finish([late], 2)
    assert late.returncode == -9
    with pytest.raises(gpu_check.PartFailed, match="exited with 3:\nwhat went wrong"):
        gpu_check.run(["-c", "import sys; print('what went wrong'); sys.exit(3)"], 60)
