"""The bench_dih and bench_teacher parts: each stage against the conventional pipeline (bench.py's comparison)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import benchmarks.main as bench_cli
from benchmarks.harness import Plan, device_name
from benchmarks.measures import Workload, ablation, compare

from .common import Context


def bench_workload(ctx: Context) -> Workload:
    """bench.py's workload at its defaults on the GPU (res110 -> res8, 100 classes, batch 64), tiny in the dry run."""
    device, cfg = bench_cli.engine_config(bench_cli.parse_args(["--gpu_id", ctx.gpu_id]))
    if ctx.gpu:
        return Workload.build("res110", "res8", 100, cfg, device, Plan(5, 20, 5))
    cfg = dataclasses.replace(cfg, batch_size=16)
    return Workload.build("res8", "res8", 10, cfg, device, Plan(0, 1, 1))


def bench_rows(ctx: Context, stages: list[str], with_ablation: bool) -> Iterator[dict[str, Any]]:
    """Each stage against the conventional pipeline with the defaults, then (GPU) with --compile graphs; then the
    ablation. A row as each measurement ends."""
    work = bench_workload(ctx)
    variants = [("defaults", work)]
    if ctx.gpu:
        variants.append(("--compile graphs", dataclasses.replace(work, cfg=dataclasses.replace(work.cfg,
                                                                                               cuda_graphs=True))))
    for stage in stages:
        for variant, workload in variants:
            for result in compare(workload, [stage]):
                yield {"variant": variant, **result, "ok": result["loss_check"]["ok"], "device": device_name(
                    work.device), "plan": dataclasses.asdict(work.plan)}
    if with_ablation and ctx.gpu:
        for row in ablation(work, stages):
            yield {"ablation": row["optimisation"], **row}


def bench_dih(ctx: Context) -> Iterator[dict[str, Any]]:
    yield from bench_rows(ctx, ["dih"], with_ablation=True)


def bench_teacher(ctx: Context) -> Iterator[dict[str, Any]]:
    yield from bench_rows(ctx, ["teacher", "heads"], with_ablation=False)
