"""The accuracy part: bf16 autocast against fp32, res8 on the synthetic set, three seeds each, all runs at once."""

from __future__ import annotations

import collections
import json
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

from .common import Context, judged, launch, log_tail, tiny_npz

# Points of mean final test accuracy (3 seeds each) that bf16 may differ from fp32 by. On a CPU, 8 epochs of the
# same runs spread 1.5 points over seeds and the two means differed by 0.83 (docs/BENCHMARKS.md, "Accuracy: bf16
# autocast against fp32"): 2 points is outside that noise; a real loss of precision (a stalled run) is far more.
ACCURACY_MARGIN = 2.0
LEARNED = 50.0  # % test accuracy that fp32 must pass for the comparison to mean anything (chance: 10%)


def accuracy(ctx: Context) -> Iterator[dict[str, Any]]:
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
    yield judged(ctx, accuracy_verdict(accuracy["on"], accuracy["off"], len(seeds)))


def accuracy_verdict(bf16: list[float], fp32: list[float], seeds: int) -> dict[str, Any]:
    """bf16 costs no accuracy: every run finished, fp32 learned (mean above `LEARNED`: equal chance-level means would
    agree trivially), and the mean final test accuracies differ by at most `ACCURACY_MARGIN` points."""
    row: dict[str, Any] = {"verdict": f"bf16 within {ACCURACY_MARGIN} points of fp32", "margin": ACCURACY_MARGIN}
    if len(bf16) < seeds or len(fp32) < seeds:
        return row | {"ok": False, "note": f"{len(bf16)} bf16 and {len(fp32)} fp32 runs of {seeds} each finished"}
    gap = statistics.mean(bf16) - statistics.mean(fp32)
    row["bf16_minus_fp32"] = round(gap, 2)
    if statistics.mean(fp32) <= LEARNED:
        return row | {"ok": False, "note": f"fp32 reached {statistics.mean(fp32):.2f}%: it did not learn"}
    ok = abs(gap) <= ACCURACY_MARGIN
    return row | {"ok": ok, "note": f"the means differ by {gap:+.2f} points" + ("" if ok else
                                                                                 f", more than {ACCURACY_MARGIN}")}

