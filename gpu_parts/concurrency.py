"""The concurrency part: aggregate throughput of 1, 2, 4 and 8 DIH student processes sharing one device."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

from .common import Context, judged, launch, log_tail, tiny_npz

CONCURRENCY_FLOOR = 0.9  # of one process's images/s, that n processes at once must keep in aggregate (timing noise)


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


def concurrency(ctx: Context) -> Iterator[dict[str, Any]]:
    """Aggregate images/s of n DIH student processes on one device, from their metrics.jsonl (epoch time includes
    evaluating the test set); the first epoch (autotuning, allocation) is left out."""
    ctx.work.mkdir(parents=True, exist_ok=True)
    (images, tests), epochs, levels = ((10_000, 2_000), 3, (1, 2, 4, 8)) if ctx.gpu else ((128, 32), 2, (1, 2))
    student = train_cohort(ctx, tiny_npz(ctx, images, tests))
    aggregates: dict[int, float] = {}
    for n in levels:
        started = time.monotonic()
        outs = [ctx.work / f"students-{n}-{i}" for i in range(n)]
        procs = [launch([*student, "--epochs", str(epochs), "--seed", str(30 + i), "--out_dir", str(out)], ctx.work,
                        out.name, max(1, (os.cpu_count() or 1) // n)) for i, out in enumerate(outs)]
        if any(proc.wait() != 0 for proc in procs):
            yield {"processes": n, "ok": False, "note": log_tail(ctx.work, outs[0].name)}
            break
        timed = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:] for out in outs]
        rates = [images * len(rows) / sum(row["seconds"] for row in rows) for rows in timed]
        aggregates[n] = sum(rates)
        yield {"processes": n, "aggregate_img_s": round(sum(rates), 1),
               "per_process_img_s": round(statistics.mean(rates), 1),
               "scaling": round(sum(rates) / aggregates[levels[0]], 2),
               "wall_s": round(time.monotonic() - started, 1), "epochs_timed": epochs - 1}
    yield judged(ctx, concurrency_verdict(aggregates, levels))


def concurrency_verdict(aggregates: dict[int, float], levels: tuple[int, ...]) -> dict[str, Any]:
    """Sharing the device costs no throughput: every level ran, and none's aggregate images/s fell below
    `CONCURRENCY_FLOOR` times one process's (a drop means contention: memory, context switches). Names the level
    with the most images/s: the `--jobs` to give reproduce.py on this GPU."""
    row: dict[str, Any] = {"verdict": f"every level at least {CONCURRENCY_FLOOR}x one process's images/s"}
    missing = [n for n in levels if n not in aggregates]
    if missing or 1 not in aggregates:
        return row | {"ok": False, "note": f"levels {', '.join(map(str, missing or [1]))} did not finish"}
    scaling = {n: rate / aggregates[1] for n, rate in aggregates.items()}
    worst, best = min(scaling, key=scaling.get), max(scaling, key=scaling.get)
    ok = scaling[worst] >= CONCURRENCY_FLOOR
    return row | {"ok": ok, "best_processes": best, "best_scaling": round(scaling[best], 2),
                  "worst_processes": worst, "worst_scaling": round(scaling[worst], 2),
                  "note": f"--jobs {best} gives the most images/s" if ok else
                          f"{worst} processes at once give {scaling[worst]:.2f}x one process's images/s"}

