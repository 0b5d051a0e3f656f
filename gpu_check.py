"""Everything a lent GPU should check for this project, in one command, most important first, in at most 7 minutes.

    make gpu-check                                   # python3 gpu_check.py: every part, in the order below
    python3 gpu_check.py --parts bench_dih,accuracy   # some parts only

Each part is a child process with its own cap (seconds; docs/BENCHMARKS.md, "The GPU check", has the budget):

    environment    15   torch, CUDA and the GPU; then torchvision (a broken one fails this part, not the check)
    smoke          90   every stage and method (teacher, heads, ce, kd, fitnets, takd, at, crd, tofd, mhkd, dih), and
                        kd + crd + dih as one group, for a few steps, eager, --compile graphs and --compile on: a
                        finite loss, and for graphs the captures and replays each run recorded (replays = steps -
                        warm-ups)
    bench_dih      60   the DIH stage against the conventional pipeline (bench.py), then with --compile graphs, then
                        the ablation
    bench_teacher  40   the teacher stage, then the heads stage, against the conventional pipeline
    concurrency    70   aggregate throughput of 1, 2, 4 and 8 DIH student processes on one GPU
    accuracy       50   bf16 against fp32: res8 on the synthetic set, three seeds each
    cuda_tests     rest pytest -m cuda, test by test: whatever time is left (at least 80 s)

The parts' caps add up to 405 s and the runner (its own start, starting and killing parts, writing the report) takes
under 15: 420 s in all. A part prints its results as `@row {json}` lines as it goes. Each row is appended to
gpu_check.jsonl the moment it arrives, then the part's end (status ok, failed, timed out, garbled or error, with
the tail of its output), and gpu_check.md is rewritten each time: a kill at any second leaves everything measured so
far, a part killed at its cap keeps the rows it finished, and a part that crashes or prints garbage is reported as
such while the others carry on. The report goes to $OUT if set, else results/gpu_check/.

This file imports nothing but torch and the standard library (and utils.py, which imports the same) until a part
starts: the parts import the project in their own processes, so a torch/torchvision mismatch fails a part, never the
report. Nothing is downloaded (the data is the built-in synthetic set). Without a GPU the same parts run as a tiny
CPU dry run (no graphs or compile rows, 5x the caps), which exercises the machinery and every smoke command line;
the exit status is 0 when every part is ok.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils import UserError, atomic_write_text

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
    argv: tuple[str, ...] = ()  # its command after `python3`; empty: this file in child mode for `name`


PARTS = [
    Part("environment", "Environment", 15),
    Part("smoke", "Smoke: every stage and method, eager / --compile graphs / --compile on", 90),
    Part("bench_dih", "DIH stage against the conventional pipeline (bench.py)", 60),
    Part("bench_teacher", "Teacher and heads stages against the conventional pipeline", 40),
    Part("concurrency", "Concurrent DIH student processes on one device", 70),
    Part("accuracy", "Accuracy: bf16 against fp32 (res8, synthetic)", 50),
    Part("cuda_tests", "CUDA tests (pytest -m cuda)", 80, rest=True),
]


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
        atomic_write_text(self.folder / "gpu_check.md", markdown(self.records))


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
            argv = list(part.argv) or [str(ROOT / "gpu_check.py"), "--child", part.name, "--gpu_id", gpu_id, "--work",
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


# ------------------------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class Context:
    """What a part's child knows: the device, its scratch folder, and whether this is the CPU dry run."""

    gpu_id: str
    work: Path
    dry: bool

    @property
    def gpu(self) -> bool:
        return not self.dry


def log_path(work: Path, name: str) -> Path:
    return work / f"{name}.log"


def launch(argv: list[str], work: Path, name: str, threads: int = 0, extra_env: dict[str, str] | None = None
           ) -> subprocess.Popen:
    """A project script in a child process (of this part's process group), its output into `<name>.log`."""
    env = {**os.environ, **(extra_env or {}), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log_path(work, name), "w") as log:
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def log_tail(work: Path, name: str, lines: int = 3) -> str:
    text = log_path(work, name).read_text(errors="replace") if log_path(work, name).exists() else ""
    return " / ".join(text.strip().splitlines()[-lines:])


def tiny_npz(ctx: Context, train: int, test: int) -> str:
    """A slice of the built-in synthetic set as an npz, written once per part."""
    from data import make_synthetic, save_npz

    path = ctx.work / f"synthetic-{train}.npz"
    if not path.exists():
        save_npz(path, *make_synthetic(train, test, seed=0))
    return str(path)


def part_environment(ctx: Context) -> Iterator[dict[str, Any]]:
    row: dict[str, Any] = {"device": "cpu", "python": sys.version.split()[0], "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cpu_cores": os.cpu_count()}
    if ctx.gpu:
        device = torch.device(f"cuda:{ctx.gpu_id.removeprefix('cuda:')}")
        p = torch.cuda.get_device_properties(device)
        row |= {"device": p.name, "index": device.index, "gpus_visible": torch.cuda.device_count(),
                "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                "bf16": torch.cuda.is_bf16_supported(including_emulation=False),
                "cudnn": torch.backends.cudnn.version()}
    yield row
    import torchvision

    yield {"torchvision": torchvision.__version__}


@dataclass(frozen=True)
class Smoke:
    """One smoke entry: a stage script with its own flags, and the entries whose eager outputs it reads."""

    name: str
    argv: list[str]
    needs: tuple[str, ...] = ()
    group: tuple[str, ...] = ()  # several --method: one student folder each, under the entry's folder

    def out_flags(self, folder: Path) -> list[str]:
        if not self.group:
            return ["--out_dir", str(folder)]
        return [flag for method in self.group for flag in (f"--{method}.out_dir", str(folder / method))]

    def runs(self, folder: Path) -> list[Path]:
        return [folder / method for method in self.group] or [folder]


SMOKE_MODES = ("off", "graphs", "on")  # --compile: eager, CUDA graphs, torch.compile


def smoke_table(work: Path) -> list[Smoke]:
    """Every stage and method; one line each. Entries read the outputs of the eager runs they need."""
    def out(name: str, file: str) -> str:
        return str(work / f"{name}-off" / file)

    teacher = ["--teacher", "res8", "--teacher_ckpt", out("teacher", "teacher.pt")]
    student = ["test_dih.py", "--student", "res8", "--method"]
    return [
        Smoke("teacher", ["train_teacher.py", "--model", "res8"]),
        Smoke("tofd_teacher", ["train_teacher.py", "--model", "res8", "--tofd"]),
        Smoke("ce", [*student, "ce"]),
        Smoke("heads", ["train_heads.py", *teacher], ("teacher",)),
        Smoke("kd", [*student, "kd", *teacher], ("teacher",)),
        Smoke("fitnets", [*student, "fitnets", "--hint_epochs", "1", *teacher], ("teacher",)),  # the phase switch
        Smoke("at", [*student, "at", *teacher], ("teacher",)),
        Smoke("crd", [*student, "crd", "--nce_k", "64", *teacher], ("teacher",)),  # in-graph sampling, bank update
        Smoke("tofd", [*student, "tofd", "--teacher", "res8", "--teacher_ckpt", out("tofd_teacher", "teacher.pt")],
              ("tofd_teacher",)),  # its temperature changes every epoch
        Smoke("mhkd", [*student, "mhkd", *teacher], ("teacher",)),
        Smoke("takd", [*student, "takd", *teacher, "--ta", "res8", "--ta_ckpt", out("kd", "student.pt")],
              ("teacher", "kd")),
        Smoke("dih", [*student, "dih", *teacher, "--heads_ckpt", out("heads", "heads.pt")], ("teacher", "heads")),
        # One process, one teacher pass per batch for three students (CRD's random stream swapped in between).
        Smoke("group", [*student, "kd", "crd", "dih", *teacher, "--heads_ckpt", out("heads", "heads.pt"),
                        "--nce_k", "64"], ("teacher", "heads"), group=("kd", "crd", "dih")),
    ]


def smoke_result(work: Path, entry: Smoke, mode: str, returncode: int, seconds: float) -> dict[str, Any]:
    """One entry's row: it ran to the end with a finite loss; under graphs, captured and replayed every step after
    the warm-ups (the counts the engine recorded in summary.json; a group's: each student's, summed)."""
    row: dict[str, Any] = {"entry": entry.name, "compile": mode, "ok": False, "seconds": round(seconds, 1)}
    runs = entry.runs(work / f"{entry.name}-{mode}")
    if returncode != 0 or not all((run / "summary.json").exists() for run in runs):
        return row | {"note": f"exit {returncode}: {log_tail(work, f'{entry.name}-{mode}')}"}
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    losses = [[json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in runs]
    row |= {"train_loss": " ".join(f"{each[-1]:.4f}" for each in losses),
            "test_acc": " ".join(f"{summary['final_test_acc']:.2f}" for summary in summaries)}
    finite = all(math.isfinite(loss) for each in losses for loss in each)
    if mode in ("graphs", "max"):
        graphs: collections.Counter[str] = collections.Counter()
        for summary in summaries:
            graphs.update(summary.get("cuda_graphs", {}))
        row["graphs"] = "{steps} steps: {warmups} warm-up, {captures} captured, {replays} replayed".format_map(graphs)
        replayed = all(summary.get("cuda_graphs", {}).get("replays", 0) >= 1 for summary in summaries)
        row["ok"] = finite and replayed and graphs["replays"] == graphs["steps"] - graphs["warmups"]
    else:
        row["ok"] = finite
    return row


def part_smoke(ctx: Context) -> Iterator[dict[str, Any]]:
    """The smoke table under each --compile mode (eager first), several entries at once, each when its needs are done.

    A few steps each: 128 images (dry run: 64) in batches of 32, two epochs with an LR drop between them (graphs are
    recaptured), FitNets one hint epoch before them."""
    ctx.work.mkdir(parents=True, exist_ok=True)
    train, test, slots = (128, 64, 8) if ctx.gpu else (64, 32, 2)
    data = tiny_npz(ctx, train, test)
    common = ["--dataset", data, "--epochs", "2", "--schedule", "1", "--batch_size", "32", "--gpu_id", ctx.gpu_id]
    table = smoke_table(ctx.work)
    modes = SMOKE_MODES if ctx.gpu else SMOKE_MODES[:1]
    pending = [(entry, mode) for mode in modes for entry in table]
    if ctx.dry:
        yield {"note": "CPU dry run: eager entries only (--compile graphs needs a GPU, --compile on takes minutes "
                       "per entry on a CPU)"}
    done: dict[str, bool] = {}  # eager entries: whether they succeeded
    running: dict[subprocess.Popen, tuple[Smoke, str, float]] = {}
    threads = max(1, (os.cpu_count() or 1) // slots)
    compile_threads = {"TORCHINDUCTOR_COMPILE_THREADS": str(threads)}  # the slots' compilers share the cores
    while pending or running:
        for entry, mode in list(pending):
            if len(running) >= slots:
                break
            if any(done.get(need) is False for need in entry.needs):
                pending.remove((entry, mode))
                yield {"entry": entry.name, "compile": mode, "ok": False,
                       "note": f"not run: needs {', '.join(entry.needs)}, which failed"}
            elif all(done.get(need) for need in entry.needs):
                pending.remove((entry, mode))
                argv = [*entry.argv, *common, "--compile", mode, *entry.out_flags(ctx.work / f"{entry.name}-{mode}")]
                running[launch(argv, ctx.work, f"{entry.name}-{mode}", threads, compile_threads)] = (
                    entry, mode, time.monotonic())
        for proc in [proc for proc in running if proc.poll() is not None]:
            entry, mode, started = running.pop(proc)
            row = smoke_result(ctx.work, entry, mode, proc.returncode, time.monotonic() - started)
            if mode == "off":
                done[entry.name] = row["ok"]
            yield row
        time.sleep(0.05)


def bench_workload(ctx: Context, stage: str):
    """bench.py's workload at its defaults on the GPU (res110 -> res8, 100 classes, batch 64), tiny in the dry run."""
    import bench

    device, cfg = bench.engine_config(bench.parse_args(["--gpu_id", ctx.gpu_id]))
    if ctx.gpu:
        return bench.Workload.build("res110", "res8", 100, cfg, device, bench.Plan(5, 20, 5))
    import dataclasses

    cfg = dataclasses.replace(cfg, batch_size=16)
    return bench.Workload.build("res8", "res8", 10, cfg, device, bench.Plan(0, 1, 1))


def bench_rows(ctx: Context, stages: list[str], ablation: bool) -> Iterator[dict[str, Any]]:
    """Each stage against the conventional pipeline with the defaults, then (GPU) with --compile graphs; then the
    ablation. A row as each measurement ends."""
    import dataclasses

    import bench

    work = bench_workload(ctx, stages[0])
    variants = [("defaults", work)]
    if ctx.gpu:
        variants.append(("--compile graphs", dataclasses.replace(work, cfg=dataclasses.replace(work.cfg,
                                                                                               cuda_graphs=True))))
    for stage in stages:
        for variant, workload in variants:
            for result in bench.compare(workload, [stage]):
                yield {"variant": variant, **result, "ok": result["loss_check"]["ok"], "device": bench.device_name(
                    work.device), "plan": dataclasses.asdict(work.plan)}
    if ablation and ctx.gpu:
        for row in bench.ablation(work, stages):
            yield {"ablation": row["optimisation"], **row}


def part_bench_dih(ctx: Context) -> Iterator[dict[str, Any]]:
    yield from bench_rows(ctx, ["dih"], ablation=True)


def part_bench_teacher(ctx: Context) -> Iterator[dict[str, Any]]:
    yield from bench_rows(ctx, ["teacher", "heads"], ablation=False)


def train_cohort(ctx: Context, data: str) -> list[str]:
    """A res20 teacher (dry run: res8) and its heads, one epoch each: what the concurrent students learn from; the
    students' command."""
    model, teacher, heads = "res20" if ctx.gpu else "res8", ctx.work / "teacher", ctx.work / "heads"
    common = ["--dataset", data, "--epochs", "1", "--gpu_id", ctx.gpu_id]
    for name, argv in (("teacher", ["train_teacher.py", "--model", model, *common, "--out_dir", str(teacher)]),
                       ("heads", ["train_heads.py", "--teacher", model, "--teacher_ckpt", str(teacher / "teacher.pt"),
                                  *common, "--out_dir", str(heads)])):
        if launch(argv, ctx.work, name).wait() != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {log_tail(ctx.work, name, 10)}")
    return ["test_dih.py", "--method", "dih", "--student", "res8", "--teacher", model, "--teacher_ckpt",
            str(teacher / "teacher.pt"), "--heads_ckpt", str(heads / "heads.pt"), "--dataset", data,
            "--gpu_id", ctx.gpu_id]


def part_concurrency(ctx: Context) -> Iterator[dict[str, Any]]:
    """Aggregate images/s of n DIH student processes on one device, from their metrics.jsonl (epoch time includes
    evaluating the test set); the first epoch (autotuning, allocation) is left out."""
    ctx.work.mkdir(parents=True, exist_ok=True)
    (images, tests), epochs, levels = ((10_000, 2_000), 3, (1, 2, 4, 8)) if ctx.gpu else ((128, 32), 2, (1, 2))
    student = train_cohort(ctx, tiny_npz(ctx, images, tests))
    first = None
    for n in levels:
        started = time.monotonic()
        outs = [ctx.work / f"students-{n}-{i}" for i in range(n)]
        procs = [launch([*student, "--epochs", str(epochs), "--seed", str(30 + i), "--out_dir", str(out)], ctx.work,
                        out.name, max(1, (os.cpu_count() or 1) // n)) for i, out in enumerate(outs)]
        if any(proc.wait() != 0 for proc in procs):
            yield {"processes": n, "ok": False, "note": log_tail(ctx.work, outs[0].name)}
            return
        timed = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:] for out in outs]
        rates = [images * len(rows) / sum(row["seconds"] for row in rows) for rows in timed]
        first = first or sum(rates)
        yield {"processes": n, "aggregate_img_s": round(sum(rates), 1),
               "per_process_img_s": round(statistics.mean(rates), 1), "scaling": round(sum(rates) / first, 2),
               "wall_s": round(time.monotonic() - started, 1), "epochs_timed": epochs - 1}


def part_accuracy(ctx: Context) -> Iterator[dict[str, Any]]:
    """Final test accuracy of res8 on the synthetic set in bf16 and in fp32, three seeds each, all runs at once."""
    ctx.work.mkdir(parents=True, exist_ok=True)
    data = tiny_npz(ctx, 10_000, 2_000) if ctx.gpu else tiny_npz(ctx, 128, 32)  # the built-in set, written once
    epochs, schedule, seeds = (["12"], ["6", "9"], (30, 50, 67)) if ctx.gpu else (["2"], ["1"], (30,))
    runs = {(amp, seed): ctx.work / f"amp-{amp}-{seed}" for amp in ("on", "off") for seed in seeds}
    procs = {launch(["train_teacher.py", "--model", "res8", "--dataset", data, "--epochs", *epochs, "--schedule",
                     *schedule, "--gpu_id", ctx.gpu_id, "--amp", amp, "--seed", str(seed), "--out_dir", str(out)],
                    ctx.work, out.name, max(1, (os.cpu_count() or 1) // len(runs))): (amp, seed)
             for (amp, seed), out in runs.items()}
    accuracy: dict[str, list[float]] = collections.defaultdict(list)
    while procs:
        for proc in [proc for proc in procs if proc.poll() is not None]:
            amp, seed = procs.pop(proc)
            out = runs[amp, seed]
            if proc.returncode != 0:
                yield {"amp": amp, "seed": seed, "ok": False, "note": log_tail(ctx.work, out.name)}
                continue
            summary = json.loads((out / "summary.json").read_text())
            accuracy[amp].append(summary["final_test_acc"])
            yield {"amp": amp, "seed": seed, "bf16": summary["config"]["amp"], "final_test_acc": summary[
                "final_test_acc"], "epochs": summary["epochs"]}
        time.sleep(0.1)
    for amp, accs in accuracy.items():
        yield {"amp": amp, "seeds": len(accs), "mean": round(statistics.mean(accs), 2),
               "std": round(statistics.stdev(accs), 2) if len(accs) > 1 else None}


class TestRows:
    """A pytest plugin: one row per test as it ends, onto the part's own output (pytest captures sys.stdout and file
    descriptor 1 while a test runs), on a line of its own (pytest's progress characters do not end theirs)."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or report.outcome != "passed":
            message = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                message = report.longrepr[2]
            elif report.failed:
                message = str(report.longrepr).strip().splitlines()[-1][:300]
            print("\n" + ROW + json.dumps({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                                    "seconds": round(report.duration, 1), "ok": not report.failed,
                                    "message": message}), file=self.out, flush=True)


def part_cuda_tests(ctx: Context) -> Iterator[dict[str, Any]]:
    """pytest -m cuda over the whole suite (the device from DIH_TEST_DEVICE, which the runner sets)."""
    import pytest

    code = pytest.main(["-m", "cuda", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")], plugins=[TestRows()])
    yield {"pytest_exit_code": int(code), "ok": int(code) in (0, 5)}  # 5: no test collected


CHILDREN: dict[str, Callable[[Context], Iterator[dict[str, Any]]]] = {
    "environment": part_environment, "smoke": part_smoke, "bench_dih": part_bench_dih,
    "bench_teacher": part_bench_teacher, "concurrency": part_concurrency, "accuracy": part_accuracy,
    "cuda_tests": part_cuda_tests,
}


def child(name: str, ctx: Context) -> int:
    """A part's own process: its rows, one a line, as they come."""
    for row in CHILDREN[name](ctx):
        print(ROW + json.dumps(row), flush=True)
    return 0


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
    p.add_argument("--child", choices=tuple(CHILDREN), help=argparse.SUPPRESS)  # a part's own process
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dry", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = sorted(set(args.parts) - {part.name for part in PARTS})
    if unknown or not args.parts:
        raise UserError(f"--parts: unknown part {unknown[0] if unknown else '(none given)'!r}; choose from "
                        f"{', '.join(part.name for part in PARTS)}")
    if args.budget_s <= RUNNER_S:
        raise UserError(f"--budget_s must be more than the runner's {RUNNER_S} s, got {args.budget_s:g}")
    return args


def out_dir(flag: str | None) -> Path:
    """--out_dir, else $OUT (what a lent machine sends back), else results/gpu_check/."""
    return Path(flag or os.environ.get("OUT") or ROOT / "results" / "gpu_check")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child, Context(args.gpu_id, args.work, args.dry))
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
    except UserError as err:
        print(f"gpu_check.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gpu_check.py: interrupted; the report holds every part that ended", file=sys.stderr)
        sys.exit(130)
