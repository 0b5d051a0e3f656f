"""The table and plots of a sweep, from whatever runs have finished: a missing run is a dash, not an error."""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import atomic_write_text

from .graph import read_summary
from .grid import Sweep


@dataclass(frozen=True)
class Stat:
    """Accuracies of one table cell over seeds: mean ± sample standard deviation (ddof=1), with n."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def __str__(self) -> str:
        if not self.values:
            return "—"
        spread = f" ± {self.std:.2f}" if self.std is not None else ""
        return f"{self.mean:.2f}{spread} (n={self.n})"


def aggregate(sweep: Sweep) -> list[dict[str, str | Stat]]:
    """One row per teacher -> student; final-epoch accuracy first, best-epoch only in labelled columns."""
    rows = []
    for teacher in sweep.teachers:
        teachers = [read_summary(sweep.teacher_dir(teacher, seed)) for seed in sweep.seeds]
        heads = [read_summary(sweep.heads_dir(teacher, seed)) for seed in sweep.seeds]
        taps = list(dict.fromkeys(h["tap"] for summary in heads if summary for h in summary["heads"]))
        for student in sweep.students:
            row: dict[str, str | Stat] = {"teacher": teacher, "student": student,
                                          "teacher acc": final_accs(teachers)}
            for tap in taps:
                row[f"head {tap}"] = Stat(tuple(h["final_test_acc"] for summary in heads if summary
                                                for h in summary["heads"] if h["tap"] == tap))
            students = {m: [read_summary(sweep.student_dir(student, m, teacher, seed)) for seed in sweep.seeds]
                        for m in sweep.methods}
            for method, summaries in students.items():
                row[method.upper()] = final_accs(summaries)
            for method, summaries in students.items():
                row[f"{method.upper()} best epoch"] = Stat(tuple(s["best_test_acc"] for s in summaries if s))
            rows.append(row)
    return rows


def final_accs(summaries: list[dict[str, Any] | None]) -> Stat:
    return Stat(tuple(s["final_test_acc"] for s in summaries if s))


def columns(rows: list[dict[str, str | Stat]]) -> list[str]:
    """Every column of the table, in first-seen order (teachers differ in their heads)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def to_markdown(sweep: Sweep, rows: list[dict[str, str | Stat]]) -> str:
    header = columns(rows)
    epochs = (f"{sweep.teacher_epochs}/{sweep.heads_epochs}/{sweep.epochs} epochs (teacher/heads/student)"
              if sweep.teacher_epochs != sweep.epochs or sweep.heads_epochs != sweep.epochs
              else f"{sweep.epochs} epochs")
    lines = [
        f"# {sweep.name}: {sweep.dataset}, seeds {' '.join(map(str, sweep.seeds))}, {epochs}",
        "",
        "Test accuracy (%) after the final epoch: mean ± sample std over seeds (n runs). Heads: the teacher's "
        "intermediate classifiers. `best epoch` columns pick the best epoch by test accuracy, which is "
        "optimistic: for reference only.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(row.get(key, Stat(()))) for key in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, str | Stat]]) -> str:
    """Numbers rather than formatted text: `<column> mean`, `<column> std`, `<column> n` for each statistic."""
    header: list[str] = []
    for key in columns(rows):
        header += [key] if isinstance(rows[0].get(key), str) else [f"{key} mean", f"{key} std", f"{key} n"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        cells: list[Any] = []
        for key in columns(rows):
            value = row.get(key, Stat(()))
            cells += [value] if isinstance(value, str) else [value.mean, value.std, value.n]
        writer.writerow(["" if cell is None else cell for cell in cells])
    return buffer.getvalue()


def read_curve(out_dir: Path) -> list[float]:
    """Test accuracy by epoch from a finished run's metrics.jsonl."""
    if read_summary(out_dir) is None:
        return []
    return [json.loads(line)["test_acc"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def plot(sweep: Sweep, rows: list[dict[str, str | Stat]], out: Path) -> None:
    """curves.png: test accuracy by epoch per method (mean over seeds, min–max band), one panel per teacher;
    bars.png: the table as grouped bars with ±std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(sweep.teachers), figsize=(max(6.5, 5.0 * len(sweep.teachers)), 4), squeeze=False)
    for ax, teacher in zip(axes[0], sweep.teachers, strict=True):
        for student in sweep.students:
            for method in sweep.methods:
                runs = [sweep.student_dir(student, method, teacher, seed) for seed in sweep.seeds]
                curves = [curve for run in runs if (curve := read_curve(run))]
                if not curves:
                    continue
                length = min(map(len, curves))
                stacked = np.array([c[:length] for c in curves])
                epochs = np.arange(1, length + 1)
                label = f"{student} {method.upper()} (n={len(curves)})"
                (line,) = ax.plot(epochs, stacked.mean(0), marker=".", label=label)
                ax.fill_between(epochs, stacked.min(0), stacked.max(0), color=line.get_color(), alpha=0.2)
        ax.set(title=f"teacher {teacher}", xlabel="epoch", ylabel="test accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(f"{sweep.name}: students' test accuracy (mean over seeds, min–max band)", fontsize="medium")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    groups = ["teacher acc"] + [m.upper() for m in sweep.methods]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.5 * len(rows) * len(groups)), 4))
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        stats = [row[group] for row in rows]
        ax.bar(np.arange(len(rows)) + i * width, [s.mean if s.n else np.nan for s in stats], width,
               yerr=[s.std or 0.0 for s in stats], capsize=3, label=group.replace(" acc", ""))
    ax.set_xticks(np.arange(len(rows)) + width * (len(groups) - 1) / 2,
                  [f"{row['teacher']} -> {row['student']}" for row in rows])
    ax.set(ylabel="final test accuracy (%)", title=f"{sweep.name}: mean ± std over seeds")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "bars.png", dpi=120)
    plt.close(fig)


def report(sweep: Sweep) -> str:
    """Write results.md, results.csv and the plots from whatever runs exist; return the markdown table."""
    rows = aggregate(sweep)
    out = sweep.results_dir / sweep.name
    table = to_markdown(sweep, rows)
    atomic_write_text(out / "results.md", table)
    atomic_write_text(out / "results.csv", to_csv(rows))
    plot(sweep, rows, out)
    return table
