"""The cuda_tests part: `pytest -m cuda` over the suite on the GPU given (DIH_TEST_DEVICE, which the runner sets),
a row per test as it ends, then the verdict: tests ran on the device (every one skipped is a failure) and none
failed."""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator
from typing import Any

from gpu_check import ROW

from .common import ROOT, Context


class TestRows:
    """A pytest plugin: one row per test as it ends, onto the part's own output (pytest captures sys.stdout and file
    descriptor 1 while a test runs), on a line of its own (pytest's progress characters do not end theirs); and
    each test's outcome (failed if any phase failed, else skipped if skipped, else passed) for the verdict."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        if self.outcomes.get(report.nodeid) != "failed" and (report.when == "call" or report.outcome != "passed"):
            self.outcomes[report.nodeid] = report.outcome
        if report.when == "call" or report.outcome != "passed":
            message = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                message = report.longrepr[2]
            elif report.failed:
                message = str(report.longrepr).strip().splitlines()[-1][:300]
            print("\n" + ROW + json.dumps({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                                           "seconds": round(report.duration, 1), "ok": not report.failed,
                                           "message": message}), file=self.out, flush=True)


def cuda_tests(ctx: Context) -> Iterator[dict[str, Any]]:
    import pytest

    rows = TestRows()
    code = pytest.main(["-m", "cuda", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")], plugins=[rows])
    yield cuda_tests_verdict(int(code), collections.Counter(rows.outcomes.values()), on_gpu=ctx.gpu)


def cuda_tests_verdict(exit_code: int, outcomes: collections.Counter[str], on_gpu: bool) -> dict[str, Any]:
    """On a GPU: pytest exited 0, at least one test passed, none failed; all skipped (DIH_TEST_DEVICE not reaching
    the tests, a GPU torch cannot use) is a failure. In the CPU dry run every CUDA test must be collected and
    skipped without failing: there, skipping is what they should do."""
    row: dict[str, Any] = {"verdict": "CUDA tests ran and passed" if on_gpu else "CUDA tests collected and skipped",
                           "pytest_exit_code": exit_code, **{k: outcomes[k] for k in ("passed", "failed", "skipped")}}
    collected = sum(outcomes.values())
    if outcomes["failed"] or exit_code not in (0, 5):
        return row | {"ok": False, "note": f"{outcomes['failed']} failed; pytest exited with {exit_code}"}
    if not collected:
        return row | {"ok": False, "note": "no CUDA test was collected"}
    if on_gpu and not outcomes["passed"]:
        return row | {"ok": False, "note": f"all {collected} skipped: none ran on the GPU"}
    return row | {"ok": True, "note": f"{outcomes['passed']} passed, {outcomes['skipped']} skipped"}
