"""Everything a lent GPU should do for this project, in one command, with one JSON and one markdown report.

    python3 gpu_check.py                        # make gpu-check: under 8 minutes on one H100
    python3 gpu_check.py --parts growth,accuracy   # only some parts (e.g. those a first run had no time for)

Parts that measure no time run side by side first: the CUDA tests (`pytest -m cuda`) and bf16 against fp32
accuracy on the synthetic set. Then the timed parts, one at a time, in order of priority: bench.py's DIH stage with
its ablation; the --compile modes on the DIH stage; the aggregate throughput of 1, 2, 4 and 8 concurrent DIH
student processes (res8 taught by a res20 teacher and its heads, each trained for an epoch first); bench.py's
growth table; the teacher and heads stages with their ablation. A global deadline (--budget_s) skips, with a
note, any part that no longer fits, instead of overrunning.

The report, gpu_check.json and gpu_check.md (tables ready to paste into docs/BENCHMARKS.md), goes to $OUT if it
is set, else results/gpu_check/. Nothing is downloaded and torchsummary is not needed: the data is the built-in
synthetic set. Without a GPU the script says so in one line, runs the parts that need none as a tiny CPU dry run
of the same machinery (so that the report writer is exercised), and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

import cli
from data import make_synthetic, save_npz
from utils import UserError, atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent
BUDGET_S = 450  # the whole check, report included, stays under 8 minutes on one H100
CONCURRENCY = (1, 2, 4, 8)
ACCURACY_SEEDS = (30, 50, 67)
TAIL_LINES = 15  # of a failed command's output, kept in the report


class PartFailed(Exception):
    """A part's command failed; the message says which and how, `partial` holds what it did find."""

    def __init__(self, message: str, partial: dict[str, Any] | None = None):
        super().__init__(message)
        self.partial = partial or {}


class PartTimedOut(Exception):
    """A part ran out of its share of the deadline."""


@dataclass(frozen=True)
class Context:
    """What every part needs: where to run, how big, and until when."""

    gpu: bool
    gpu_id: str  # "0" on a GPU machine, "cpu" in the dry run
    work: Path  # scratch folder for runs and data
    deadline: float  # time.monotonic() by which every part has ended

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ------------------------------------------------------------------------------------------ running


def child_env(threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def start(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A child in its own process group, so that a timeout ends it with its DataLoader workers."""
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every process by `timeout` seconds from now and return their outputs; kill all if one is late, or
    on Ctrl-C (in their own process groups, they would outlive this one)."""
    end, outputs, waiting = time.monotonic() + timeout, [], procs[0]
    try:
        for waiting in procs:
            outputs.append(waiting.communicate(timeout=max(end - time.monotonic(), 0.1))[0])
    except BaseException as err:
        late = [proc for proc in procs if proc.poll() is None]
        for proc in late:
            os.killpg(proc.pid, signal.SIGKILL)
        culprit = late[0] if late else waiting  # (the one waited for may have ended since)
        output = culprit.communicate()[0]
        for proc in late[1:]:
            proc.communicate()
        if not isinstance(err, subprocess.TimeoutExpired):
            raise
        raise PartTimedOut(f"`{' '.join(culprit.args[1:])}` was still running after {timeout:.0f} s; killed:\n"
                           f"{tail(output)}") from None
    for proc, output in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise PartFailed(f"`{' '.join(proc.args[1:])}` exited with {proc.returncode}:\n{tail(output)}")
    return outputs


def tail(output: str | None) -> str:
    return "\n".join((output or "").strip().splitlines()[-TAIL_LINES:])


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    return finish([start(argv, env)], timeout)[0]


def command(argv: list[str]) -> str:
    """The command as a user would type it."""
    return "python3 " + " ".join(argv)


def last_json(output: str) -> dict[str, Any]:
    """The JSON object that bench.py prints last."""
    return json.loads(output.strip().splitlines()[-1])


def metrics(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- parts


ENVIRONMENT = """
import json, os, sys, torch, torchvision
gpu = torch.cuda.is_available()
p = torch.cuda.get_device_properties(0) if gpu else None
print(json.dumps({
    "device": p.name if gpu else "cpu", "capability": f"{p.major}.{p.minor}" if gpu else None,
    "memory_gib": round(p.total_memory / 2**30, 1) if gpu else None,
    "bf16": torch.cuda.is_bf16_supported(including_emulation=False) if gpu else None, "cpu_cores": os.cpu_count(),
    "python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if gpu else None}))
"""


def environment(ctx: Context, timeout: float) -> dict[str, Any]:
    """The software and the device, read in a child: this process holds no CUDA context (a GPU in exclusive
    mode would refuse every child otherwise)."""
    return {"commands": ["python3 -c '<versions and device>'"], "data": last_json(run(["-c", ENVIRONMENT], timeout))}


def cuda_tests(ctx: Context, timeout: float) -> dict[str, Any]:
    """tests/test_cuda.py; counts and the names of failures from its JUnit report."""
    report = ctx.work / "junit.xml"
    argv = ["-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
            f"--junitxml={report}"]
    try:
        finish([start(argv)], timeout)
    except PartFailed:
        if not report.exists():  # pytest missing, or a crash before any test ran
            raise
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('name')}: {(case[0].get('message') or '').splitlines()[0][:200] if len(case) else ''}"
              for case in suite.iter("testcase") if case.find("failure") is not None or case.find("error") is not None]
    result = {"commands": [command(argv[:-1])], "data": {**counts, "failed": failed,
                                                           "seconds": float(suite.get("time", 0))}}
    if failed:
        raise PartFailed(f"{len(failed)} CUDA test(s) failed: " + "; ".join(failed), result)
    return result


def bench_args(ctx: Context, *extra: str) -> list[str]:
    """bench.py on the GPU at its defaults, or tiny on the CPU (the dry run)."""
    tiny = [] if ctx.gpu else ["--teacher", "res8", "--num_classes", "10", "--batch_size", "16", "--steps", "1",
                               "--warmup", "0", "--repeats", "1"]
    return ["bench.py", "--gpu_id", ctx.gpu_id, *tiny, *extra]


def bench_dih(ctx: Context, timeout: float) -> dict[str, Any]:
    argv = bench_args(ctx, "--stages", "dih", *(["--ablation"] if ctx.gpu else []))
    return {"commands": [command(argv)], "data": last_json(run(argv, timeout))}


def compile_modes(ctx: Context, timeout: float) -> dict[str, Any]:
    """The DIH stage with each --compile mode; wall time includes compiling and capturing."""
    end, commands, rows = time.monotonic() + timeout, [], []
    for mode in ("graphs", "on", "max"):
        argv = bench_args(ctx, "--stages", "dih", "--compile", mode)
        commands.append(command(argv))
        record = last_json(run(argv, end - time.monotonic()))
        rows.append({"compile": mode, "fast_img_s": record["fast_img_s"], "ratio": record["ratio"],
                     "fast_ms_per_step": record["fast_ms_per_step"], "wall_s": record["total_s"]})
    return {"commands": commands, "data": {"rows": rows}}


def train_cohort(ctx: Context, dataset: str, timeout: float) -> tuple[list[str], list[str]]:
    """A res20 teacher and its heads, one epoch each: what the concurrent students learn from."""
    teacher, heads = ctx.work / "teacher", ctx.work / "heads"
    common = ["--dataset", dataset, "--epochs", "1", "--gpu_id", ctx.gpu_id]
    steps = [["train_teacher.py", "--model", "res20", *common, "--out_dir", str(teacher)],
             ["train_heads.py", "--teacher", "res20", "--teacher_ckpt", str(teacher / "teacher.pt"), *common,
              "--out_dir", str(heads)]]
    end = time.monotonic() + timeout
    for argv in steps:
        run(argv, end - time.monotonic())
    student = ["test_dih.py", "--method", "dih", "--student", "res8", "--teacher", "res20", "--teacher_ckpt",
               str(teacher / "teacher.pt"), "--heads_ckpt", str(heads / "heads.pt"), *common[:2]]
    return [command(argv) for argv in steps], student


def concurrency(ctx: Context, timeout: float) -> dict[str, Any]:
    """Aggregate images/s of n DIH student processes on one device, from their metrics.jsonl (epoch time
    includes evaluating the test set). The first epoch (autotuning, allocation) is left out. The data is the
    built-in synthetic set written once as an npz, so that no process renders it again."""
    end = time.monotonic() + timeout
    (images, tests), epochs, levels = ((10_000, 2_000), 3, CONCURRENCY) if ctx.gpu else ((256, 64), 2, (1, 2))
    dataset = str(ctx.work / f"synthetic-{images}.npz")
    save_npz(dataset, *make_synthetic(images, tests, seed=0))
    commands, student = train_cohort(ctx, dataset, end - time.monotonic())
    rows = []
    for n in levels:
        outs = [ctx.work / f"students-{n}" / f"{i}" for i in range(n)]
        argvs = [[*student, "--epochs", str(epochs), "--gpu_id", ctx.gpu_id, "--seed", str(30 + i), "--out_dir",
                  str(out)] for i, out in enumerate(outs)]
        threads = max(1, (os.cpu_count() or 1) // n)
        started = time.monotonic()
        finish([start(argv, child_env(threads)) for argv in argvs], end - time.monotonic())
        wall = time.monotonic() - started
        timed = [metrics(out)[1:] for out in outs]
        rates = [images * len(epochs_) / sum(row["seconds"] for row in epochs_) for epochs_ in timed]
        rows.append({"processes": n, "aggregate_img_s": round(sum(rates), 1),
                     "per_process_img_s": round(statistics.mean(rates), 1), "wall_s": round(wall, 1)})
        commands.append(f"{n} x " + command(argvs[0]).replace("--seed 30", "--seed 30+i"))
    for row in rows:
        row["scaling"] = round(row["aggregate_img_s"] / rows[0]["aggregate_img_s"], 2)
    return {"commands": commands, "data": {"rows": rows, "epochs": epochs, "dataset": dataset}}


def growth(ctx: Context, timeout: float) -> dict[str, Any]:
    argv = bench_args(ctx, "--stages", "dih", "--growth")
    return {"commands": [command(argv)], "data": last_json(run(argv, timeout))}


def bench_teacher_heads(ctx: Context, timeout: float) -> dict[str, Any]:
    argv = bench_args(ctx, "--stages", "teacher,heads", "--ablation")
    return {"commands": [command(argv)], "data": last_json(run(argv, timeout))}


def accuracy(ctx: Context, timeout: float) -> dict[str, Any]:
    """Final test accuracy of res8 on the synthetic set in bf16 and fp32, three seeds, all runs at once."""
    runs = {(amp, seed): ctx.work / f"amp-{amp}-{seed}" for amp in ("on", "off") for seed in ACCURACY_SEEDS}
    argvs = {key: ["train_teacher.py", "--model", "res8", "--dataset", "synthetic", "--epochs", "15", "--schedule",
                   "8", "12", "--gpu_id", ctx.gpu_id, "--amp", key[0], "--seed", str(key[1]), "--out_dir", str(out)]
             for key, out in runs.items()}
    threads = max(1, (os.cpu_count() or 1) // len(runs))
    finish([start(argv, child_env(threads)) for argv in argvs.values()], timeout)
    rows = []
    for amp in ("on", "off"):
        accs = [json.loads((runs[amp, seed] / "summary.json").read_text())["final_test_acc"]
                for seed in ACCURACY_SEEDS]
        rows.append({"amp": amp, "final_test_acc": accs, "mean": round(statistics.mean(accs), 2),
                     "std": round(statistics.stdev(accs), 2)})
    commands = [command(argvs["on", 30]).replace("--amp on", "--amp {on,off}").replace("--seed 30", "--seed S")]
    return {"commands": commands, "data": {"seeds": list(ACCURACY_SEEDS), "rows": rows}}


@dataclass(frozen=True, eq=False)  # eq=False: hashable by identity, a key of the report's entries
class Part:
    name: str
    title: str
    run: Callable[[Context, float], dict[str, Any]]
    gpu_only: bool  # skipped in the CPU dry run
    timed: bool  # measures speed: runs alone; the untimed parts run side by side first
    cap_s: float  # at most this long
    min_s: float  # not started with less time left than this


PARTS = [
    Part("environment", "Environment", environment, False, False, 60, 10),
    Part("cuda_tests", "CUDA tests", cuda_tests, False, False, 240, 60),
    Part("accuracy", "Accuracy: bf16 against fp32 (res8, synthetic, 15 epochs)", accuracy, True, False, 180, 60),
    Part("bench_dih", "DIH stage: fast vs conventional, and the ablation", bench_dih, False, True, 120, 45),
    Part("compile_modes", "DIH stage: --compile modes", compile_modes, True, True, 150, 60),
    Part("concurrency", "Concurrent DIH student processes on one device", concurrency, False, True, 120, 60),
    Part("growth", "Growth: DIH epoch time against teacher depth and batch", growth, True, True, 100, 45),
    Part("bench_teacher_heads", "Teacher and heads stages, and their ablation", bench_teacher_heads, True, True, 150,
         60),
]


# ------------------------------------------------------------------------------------------ report


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def md_bench(data: dict[str, Any]) -> str:
    """bench.py's JSON: the stage table, then the ablation and growth tables when present."""
    stages = data["stages"]
    out = [f"Device `{data['device']}`, torch {data['torch']}; fast path: amp {data['amp']}, channels_last "
           f"{data['channels_last']}, compile {data['compile']}, CUDA graphs {data.get('cuda_graphs')}; load average "
           f"{data['load_avg_1m']}.", "",
           md_table(["stage", "conventional img/s", "fast img/s", "ratio"],
                    [[s, r["conventional_img_s"], r["fast_img_s"], f"{r['ratio']:.2f}x"] for s, r in stages.items()])]
    if "ablation" in data:
        out += ["", md_table(["stage", "optimisation", "in the fast path", "img/s on", "img/s off", "gain"],
                             [[r["stage"], r["optimisation"], "yes" if r["in_fast_path"] else "no", r["img_s_on"],
                               r["img_s_off"], f"{r['gain']:.2f}x"] for r in data["ablation"]])]
    if "growth" in data:
        out += ["", md_table(["teacher", "batch", "conventional s/epoch", "fast s/epoch", "ratio"],
                             [[r["teacher"], r["batch_size"], r["conventional_epoch_s"], r["fast_epoch_s"],
                               f"{r['ratio']:.2f}x"] for r in data["growth"]])]
    return "\n".join(out)


def md_part(name: str, data: dict[str, Any]) -> str:
    if name == "environment":
        return md_table(list(data), [list(data.values())])
    if name == "cuda_tests":
        failed = "".join(f"\n- FAILED {f}" for f in data["failed"])
        return (f"{data['tests']} tests: {data['tests'] - data['failures'] - data['errors'] - data['skipped']} passed, "
                f"{data['failures']} failed, {data['errors']} errors, {data['skipped']} skipped, in "
                f"{data['seconds']:.0f} s.{failed}")
    if name in ("bench_dih", "growth", "bench_teacher_heads"):
        return md_bench(data)
    if name == "compile_modes":
        return md_table(["--compile", "fast img/s", "ratio to conventional", "ms/step", "wall s (incl. compiling)"],
                        [[r["compile"], r["fast_img_s"], f"{r['ratio']:.2f}x", r["fast_ms_per_step"], r["wall_s"]]
                         for r in data["rows"]])
    if name == "concurrency":
        return md_table(["processes", "aggregate img/s", "per process img/s", "scaling", "wall s"],
                        [[r["processes"], r["aggregate_img_s"], r["per_process_img_s"], f"{r['scaling']:.2f}x",
                          r["wall_s"]] for r in data["rows"]])
    if name == "accuracy":
        return md_table(["amp", *[f"seed {s}" for s in data["seeds"]], "mean ± std"],
                        [[r["amp"], *r["final_test_acc"], f"{r['mean']:.2f} ± {r['std']:.2f}"] for r in data["rows"]])
    raise ValueError(name)


def markdown(report: dict[str, Any]) -> str:
    env = next((p.get("data") for p in report["parts"] if p["name"] == "environment" and p.get("data")), {})
    lines = [f"# gpu_check: {env.get('device', 'unknown device')} ({report['date']})", "",
             f"{'**CPU dry run, no GPU: not GPU numbers.** ' if report['dry_run'] else ''}`{report['command']}`, "
             f"{report['wall_s']:.0f} s of a {report['budget_s']} s budget.", "",
             md_table(["part", "status", "seconds"], [[p["title"], p["status"], p.get("seconds", "")]
                                                      for p in report["parts"]])]
    for part in report["parts"]:
        lines += ["", f"## {part['title']}", ""]
        if part.get("note"):
            first, _, rest = part["note"].partition("\n")
            lines += [f"{part['status']}: {first}", ""] + (["```", rest, "```", ""] if rest else [])
        if part.get("commands"):
            lines += ["```", *part["commands"], "```", ""]
        if part.get("data"):
            lines.append(md_part(part["name"], part["data"]))
    return "\n".join(lines).rstrip() + "\n"


# -------------------------------------------------------------------------------------------- main


def run_part(ctx: Context, part: Part) -> dict[str, Any]:
    """Run one part within the deadline; its report entry, whatever happens."""
    entry: dict[str, Any] = {"name": part.name, "title": part.title}
    if part.gpu_only and not ctx.gpu:
        entry.update(status="skipped", note="needs a GPU")
    elif ctx.left() < part.min_s:
        entry.update(status="skipped", note=f"{ctx.left():.0f} s of the --budget_s deadline were left, this part "
                                            f"needs at least {part.min_s:.0f}; run it with --parts {part.name}")
    else:
        started = time.monotonic()
        try:
            entry.update(status="ok", **part.run(ctx, min(part.cap_s, ctx.left())))
        except PartFailed as err:
            entry.update(status="failed", note=str(err), **err.partial)
        except PartTimedOut as err:
            entry.update(status="timed out", note=str(err))
        entry["seconds"] = round(time.monotonic() - started, 1)
    print(f"gpu_check: {part.name}: {entry['status']}" + (f" ({entry['seconds']:.0f} s)" if "seconds" in entry else "")
          + (f": {entry['note'].splitlines()[0]}" if entry.get("note") else ""), flush=True)
    return entry


def out_dir(flag: str | None) -> Path:
    """--out_dir, else $OUT (what a lent machine sends back), else results/gpu_check/."""
    return Path(flag or os.environ.get("OUT") or ROOT / "results" / "gpu_check")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(part.name for part in PARTS), help="some of these, comma-separated")
    p.add_argument("--budget_s", type=float, default=BUDGET_S,
                   help="deadline for the whole check in seconds; parts that no longer fit are skipped")
    p.add_argument("--out_dir", default=None, help="where the report goes (default: $OUT, else results/gpu_check)")
    args = p.parse_args(argv)
    args.parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = sorted(set(args.parts) - {part.name for part in PARTS})
    if unknown or not args.parts:
        raise UserError(f"--parts: unknown part {unknown[0] if unknown else '(none given)'!r}; choose from "
                        f"{', '.join(part.name for part in PARTS)}")
    if args.budget_s <= 0:
        raise UserError(f"--budget_s must be positive, got {args.budget_s}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    gpu = torch.cuda.is_available()  # creates no CUDA context: the parts run in children
    if not gpu:
        print("gpu_check: no CUDA GPU is visible; running only the parts that need none, as a tiny CPU dry run",
              flush=True)
    report: dict[str, Any] = {"command": command(["gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
                              "date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": not gpu,
                              "budget_s": args.budget_s}
    parts = [part for part in PARTS if part.name in args.parts]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        ctx = Context(gpu, "0" if gpu else "cpu", Path(work), began + args.budget_s)
        untimed = [part for part in parts if not part.timed]
        with ThreadPoolExecutor(max(len(untimed), 1)) as pool:  # they measure no time: side by side
            entries = dict(zip(untimed, pool.map(partial(run_part, ctx), untimed), strict=True))
        entries |= {part: run_part(ctx, part) for part in parts if part.timed}
    report["parts"] = [entries[part] for part in parts]
    report["wall_s"] = round(time.monotonic() - began, 1)
    folder = out_dir(args.out_dir)
    atomic_write_json(folder / "gpu_check.json", report)
    atomic_write_text(folder / "gpu_check.md", markdown(report))
    print(f"gpu_check: report in {folder / 'gpu_check.md'} and gpu_check.json ({report['wall_s']:.0f} s)")
    return 1 if any(p["status"] == "failed" for p in report["parts"]) else 0


if __name__ == "__main__":
    cli.main_guard(lambda argv: sys.exit(main(argv)), "rerun it (this run wrote no report)")
