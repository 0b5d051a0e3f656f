"""Everything a lent GPU should check for this project, in one command, most important first, in at most 7 minutes.

    make gpu-check                                   # python3 gpu_check.py: every part, in the order below
    python3 gpu_check.py --parts bench_dih,accuracy   # some parts only

Each part is a child process with its own cap (seconds; docs/BENCHMARKS.md, "The GPU check", has the budget):

    environment    15   torch, CUDA and the GPU; then torchvision (a broken one fails this part, not the check)
    smoke          90   every stage and every method of methods.METHODS, and kd + crd + dih as one group, for a few
                        steps, eager, --compile graphs and --compile on: a finite loss, and for graphs the captures
                        and replays each run recorded (replays = steps - warm-ups)
    bench_dih      60   the DIH stage against the conventional pipeline (bench.py), then with --compile graphs, then
                        the ablation
    bench_teacher  40   the teacher stage, then the heads stage, against the conventional pipeline
    concurrency    70   aggregate throughput of 1, 2, 4 and 8 DIH student processes on one GPU; verdict: no level
                        below 0.9x one process's
    accuracy       50   bf16 against fp32: res8 on the synthetic set, three seeds each; verdict: the means within 2
                        points
    cuda_tests     rest pytest -m cuda, test by test: whatever time is left (at least 80 s); verdict: tests ran
                        (all skipped is a failure) and none failed

The parts' caps add up to 405 s and the runner (its own start, starting and killing parts, writing the report) takes
under 15: 420 s in all. A part prints its results as `@row {json}` lines as it goes. Each row is appended to
gpu_check.jsonl the moment it arrives, then the part's end (status ok, failed, timed out, garbled or error, with
the tail of its output), and gpu_check.md is rewritten each time: a kill at any second leaves everything measured so
far, a part killed at its cap keeps the rows it finished, and a part that crashes or prints garbage is reported as
such while the others carry on. The report goes to $OUT if set, else results/gpu_check/.

This file is the runner and imports nothing but torch and the standard library (tests/test_gpu_check.py checks its
imports): the parts are the package gpu_parts/, each started as `python3 -m gpu_parts NAME` in its own process,
which imports the project, so a torch/torchvision mismatch fails a part, never the report. Nothing is downloaded (the
data is the built-in synthetic set). The accuracy, concurrency and CUDA-test parts end with a verdict row (their
thresholds are in gpu_parts/accuracy.py, concurrency.py and cuda_tests.py). Without a GPU the same parts run as a
tiny CPU dry run (no graphs or compile rows, 5x the caps, verdicts shown but not judged), which exercises the
machinery and every smoke command line; the exit status is 0 when every part is ok.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
ROW = "@row "  # a result row on a part's output: this prefix, then one JSON object
BUDGET_S = 420  # the whole check: 7 minutes of wall time
RUNNER_S = 15  # of that, what the runner itself may take; the parts share the rest
DRY_SLACK = 5  # the CPU dry run allows its tiny parts 5x the time (a CPU, perhaps a busy one, not the GPU they fit)
TAIL_LINES = 20  # of a part's output, kept with its end record
OK = "ok"


@dataclass(frozen=True)
class Part:
    """One part: a child process, killed with its whole process group at `cap_s` (`rest`: at the deadline)."""

    name: str
    title: str
    cap_s: float
    rest: bool = False  # takes whatever time is left (the last part)
    argv: tuple[str, ...] = ()  # its command after `python3`; empty: `-m gpu_parts NAME`


PARTS = [
    Part("environment", "Environment", 15),
    Part("smoke", "Smoke: every stage and method, eager / --compile graphs / --compile on", 90),
    Part("bench_dih", "DIH stage against the conventional pipeline (bench.py)", 60),
    Part("bench_teacher", "Teacher and heads stages against the conventional pipeline", 40),
    Part("concurrency", "Concurrent DIH student processes on one device", 70),
    Part("accuracy", "Accuracy: bf16 against fp32 (res8, synthetic)", 50),
    Part("cuda_tests", "CUDA tests (pytest -m cuda)", 80, rest=True),
]


class UsageError(Exception):
    """A bad flag: one line and exit status 2."""


# ------------------------------------------------------------------------------------------- the report


class Report:
    """gpu_check.jsonl (appended, one record a line, flushed to disk at once) and gpu_check.md (rewritten)."""

    def __init__(self, folder: Path, start: dict[str, Any]):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        self.add(start)

    def add(self, record: dict[str, Any]) -> None:
        with open(self.folder / "gpu_check.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        replace_file(self.folder / "gpu_check.md", markdown(self.records))


def replace_file(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a reader never sees half."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def markdown(records: list[dict[str, Any]]) -> str:
    """The report so far: the parts' status table, then each part's rows as a table (columns as they come)."""
    start = records[0]
    rows: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    ends: dict[str, dict[str, Any]] = {}
    for record in records[1:]:
        if "row" in record:
            rows[record["part"]].append(record["row"])
        else:
            ends[record["part"]] = record
    device = next((row["device"] for row in rows["environment"] if "device" in row), "unknown device")
    lines = [f"# gpu_check: {device} ({start['date']})", "",
             f"{'**CPU dry run, no GPU: not GPU numbers.** ' if start['dry_run'] else ''}`{start['command']}`; "
             f"budget {start['budget_s']:.0f} s.", "",
             md_table(["part", "status", "seconds", "rows", "cap s"],
                      [[p["title"], ends.get(p["name"], {}).get("status", "running" if p["name"] in rows else "-"),
                        ends.get(p["name"], {}).get("seconds", ""), len(rows[p["name"]]), p["cap_s"]]
                       for p in start["parts"]])]
    for part in start["parts"]:
        end = ends.get(part["name"])
        if end is None and not rows[part["name"]]:
            continue
        lines += ["", f"## {part['title']}", ""]
        if end is not None and end.get("note"):
            lines += [f"{end['status']}: {end['note']}", ""]
        if end is not None and end["status"] != OK and end.get("tail"):
            lines += ["```", *end["tail"], "```", ""]
        if rows[part["name"]]:
            header = list(dict.fromkeys(key for row in rows[part["name"]] for key in row))
            lines.append(md_table(header, [[row.get(key, "") for key in header] for row in rows[part["name"]]]))
    return "\n".join(lines).rstrip() + "\n"


# -------------------------------------------------------------------------------------------- the runner


def run_part(argv: list[str], cap_s: float, env: dict[str, str], on_row: Callable[[dict[str, Any]], None]
             ) -> dict[str, Any]:
    """Run `python3 argv` for at most `cap_s` seconds, handing each result row to `on_row` as it arrives; return the
    part's end record (status, note, output tail). The child leads its own process group, so that a kill at the
    cap ends whatever it started too."""
    started, tail, garbled, rows, failed = time.monotonic(), collections.deque(maxlen=TAIL_LINES), [], 0, 0
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    timed_out = False
    try:
        while True:
            if time.monotonic() >= started + cap_s:
                timed_out = True
                break
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if proc.poll() is not None:  # ended, though something it started may still hold its output open
                    break
                continue
            if line is None:
                break
            line = line.rstrip("\n")
            tail.append(line)
            if not line.startswith(ROW):
                continue
            try:
                row = json.loads(line[len(ROW):])
            except ValueError:
                row = None
            if not isinstance(row, dict):
                garbled.append(line)
                continue
            rows += 1
            failed += row.get("ok") is False
            on_row(row)
    finally:
        try:  # the whole group: the part and whatever it started, ended or not
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    seconds = round(time.monotonic() - started, 1)
    notes = []
    if timed_out:
        notes.append(f"killed at its cap of {cap_s:.0f} s; the {rows} row(s) it finished are kept")
    elif proc.returncode != 0:
        notes.append(f"exited with {proc.returncode}")
    elif rows == 0:
        notes.append("exited without a result row")
    if failed:
        notes.append(f"{failed} of {rows} row(s) not ok")
    if garbled:
        notes.append(f"{len(garbled)} result line(s) were not a JSON object, the first: {garbled[0][:120]!r}")
    status = ("timed out" if timed_out else "failed" if proc.returncode != 0 or rows == 0 or failed
              else "garbled" if garbled else OK)
    return {"status": status, "seconds": seconds, "rows": rows, "note": "; ".join(notes), "tail": list(tail)}


def check(parts: list[Part], folder: Path, budget_s: float, gpu: bool, gpu_id: str, command: str) -> list[dict]:
    """Run `parts` in order within `budget_s` seconds, reporting into `folder` as they go; the end records."""
    slack = 1 if gpu else DRY_SLACK
    started = time.monotonic()
    deadline = started + slack * (budget_s - RUNNER_S)
    report = Report(folder, {"event": "start", "command": command, "dry_run": not gpu, "budget_s": budget_s,
                             "date": datetime.datetime.now().isoformat(timespec="seconds"),
                             "parts": [{"name": p.name, "title": p.title, "cap_s": p.cap_s} for p in parts]})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "DIH_TEST_DEVICE": "cpu" if not gpu else f"cuda:{gpu_id.removeprefix('cuda:')}"}
    ends = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        for part in parts:
            left = deadline - time.monotonic()
            cap = left if part.rest else min(slack * part.cap_s, left)
            argv = list(part.argv) or ["-m", "gpu_parts", part.name, "--gpu_id", gpu_id, "--work",
                                       str(Path(work) / part.name), *([] if gpu else ["--dry"])]
            if cap < 1:
                end = {"status": "skipped", "seconds": 0, "rows": 0, "note": "no time was left", "tail": []}
            else:
                print(f"gpu_check: {part.name} (at most {cap:.0f} s)", flush=True)
                try:
                    end = run_part(argv, cap, env, lambda row, name=part.name: report.add({"part": name, "row": row}))
                except Exception as err:  # the runner's own failure on this part: reported, and the next part runs
                    end = {"status": "error", "seconds": 0, "rows": 0, "note": f"{type(err).__name__}: {err}",
                           "tail": traceback.format_exc().splitlines()[-TAIL_LINES:]}
            end = {"part": part.name, **end}
            report.add(end)
            ends.append(end)
            print(f"gpu_check: {part.name}: {end['status']} ({end['seconds']:.0f} s)"
                  + (f": {end['note']}" if end["note"] else ""), flush=True)
    return ends


# ---------------------------------------------------------------------------------------------- main


class Parser(argparse.ArgumentParser):
    """Errors as one line (exit 2), as every script of the project."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(part.name for part in PARTS), help="some of these, comma-separated")
    p.add_argument("--budget_s", type=float, default=BUDGET_S,
                   help=f"the whole check's wall time in seconds (default {BUDGET_S}); {RUNNER_S} of them are the "
                        "runner's, the parts share the rest within their caps")
    p.add_argument("--gpu_id", default="0", help="the GPU to check (default 0)")
    p.add_argument("--out_dir", default=None, help="where the report goes (default: $OUT, else results/gpu_check)")
    args = p.parse_args(argv)
    args.parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = sorted(set(args.parts) - {part.name for part in PARTS})
    if unknown or not args.parts:
        raise UsageError(f"--parts: unknown part {unknown[0] if unknown else '(none given)'!r}; choose from "
                        f"{', '.join(part.name for part in PARTS)}")
    if args.budget_s <= RUNNER_S:
        raise UsageError(f"--budget_s must be more than the runner's {RUNNER_S} s, got {args.budget_s:g}")
    return args


def out_dir(flag: str | None) -> Path:
    """--out_dir, else $OUT (what a lent machine sends back), else results/gpu_check/."""
    return Path(flag or os.environ.get("OUT") or ROOT / "results" / "gpu_check")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()  # no CUDA context in this process: the parts have the GPU to themselves
    if not gpu:
        print("gpu_check: no CUDA GPU is visible; every part runs as a tiny CPU dry run", flush=True)
    folder = out_dir(args.out_dir)
    command = "python3 gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ends = check([part for part in PARTS if part.name in args.parts], folder, args.budget_s, gpu,
                 args.gpu_id if gpu else "cpu", command.strip())
    print(f"gpu_check: report in {folder / 'gpu_check.md'} and gpu_check.jsonl")
    return 0 if all(end["status"] == OK for end in ends) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as err:
        print(f"gpu_check.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gpu_check.py: interrupted; the report holds every part that ended", file=sys.stderr)
        sys.exit(130)
