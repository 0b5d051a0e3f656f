"""The table and plots of a sweep, from whatever runs have finished: a missing run is a dash, not an error."""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from methods.takd import parameter_count
from utils import atomic_write_text

from . import published
from .graph import read_summary
from .grid import METHODS, PRESETS, Sweep

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


# The references of the paired comparison: every method against canonical KD, and against DIH.
REFERENCES = ("kd", "dih")


@dataclass(frozen=True)
class Difference(Stat):
    """A method's final accuracy minus a reference method's, seed by seed, over the seeds where both finished.

    Paired: students of one seed start from the same weights and see the same batches in the same order, so the
    difference leaves out most of what varies from seed to seed. `wins`: the seeds where the method is ahead.
    """

    @property
    def wins(self) -> int:
        return sum(value > 0 for value in self.values)

    def __str__(self) -> str:
        if not self.values:
            return "—"
        spread = f" ± {self.std:.2f}" if self.std is not None else ""
        return f"{self.mean:+.2f}{spread}, won {self.wins}/{self.n}"


def paired(method: list[dict[str, Any] | None], reference: list[dict[str, Any] | None]) -> Difference:
    """`method`'s final accuracy minus `reference`'s, seed by seed (both lists in the sweep's seed order)."""
    return Difference(tuple(m["final_test_acc"] - r["final_test_acc"] for m, r in zip(method, reference, strict=True)
                            if m and r))


def difference_column(method: str, reference: str) -> str:
    """The column of `method` − `reference` in rows and in results.csv."""
    return f"{label(method)} vs {label(reference)}"


def label(method: str) -> str:
    """A method's name in tables and legends."""
    return {"fitnets": "FitNets"}.get(method, method.upper())


def colour(method: str) -> str:
    """One colour per method in every plot (matplotlib's tab10, by the method's place in the comparison)."""
    return f"C{METHODS.index(method) % 10}"


def aggregate(sweep: Sweep) -> list[dict[str, str | Stat]]:
    """One row per teacher -> student; final-epoch accuracy first, best-epoch only in labelled columns."""
    rows = []
    for teacher in sweep.teachers:
        teachers = [read_summary(sweep.teacher_dir(teacher, seed)) for seed in sweep.seeds]
        heads = [read_summary(sweep.heads_dir(teacher, seed)) for seed in sweep.seeds]
        taps = list(dict.fromkeys(h["tap"] for summary in heads if summary for h in summary["heads"]))
        for student in [s for t, s in sweep.pairs if t == teacher]:
            row: dict[str, str | Stat] = {"teacher": teacher, "student": student,
                                          "teacher acc": final_accs(teachers)}
            if "tofd" in sweep.methods:
                tofd = [read_summary(sweep.teacher_dir(teacher, seed, "tofd")) for seed in sweep.seeds]
                row["TOFD teacher acc"] = final_accs(tofd)
            for tap in taps:
                row[f"head {tap}"] = Stat(tuple(h["final_test_acc"] for summary in heads if summary
                                                for h in summary["heads"] if h["tap"] == tap))
            students = {m: [read_summary(sweep.student_dir(student, m, teacher, seed)) for seed in sweep.seeds]
                        for m in sweep.methods}
            for method, summaries in students.items():
                row[label(method)] = final_accs(summaries)
            for method, summaries in students.items():
                row[f"{label(method)} best epoch"] = Stat(tuple(s["best_test_acc"] for s in summaries if s))
            for reference in (r for r in REFERENCES if r in students):
                for method in (m for m in students if m != reference):
                    row[difference_column(method, reference)] = paired(students[method], students[reference])
            rows.append(row)
    return rows


def final_accs(summaries: list[dict[str, Any] | None]) -> Stat:
    return Stat(tuple(s["final_test_acc"] for s in summaries if s))


def columns(rows: list[dict[str, str | Stat]]) -> list[str]:
    """Every column of the table, in first-seen order (teachers differ in their heads)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def to_markdown(sweep: Sweep, rows: list[dict[str, str | Stat]]) -> str:
    """The accuracy table, then one table of paired differences per reference method in the sweep."""
    header = [key for key in columns(rows) if not isinstance(rows[0].get(key), Difference)]
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
    for reference in (r for r in REFERENCES if r in sweep.methods):
        others = [m for m in sweep.methods if m != reference]
        lines += [
            "",
            f"## Paired by seed: each method minus {label(reference)}",
            "",
            f"Final test accuracy minus {label(reference)}'s of the same seed (points): mean ± sample std over the "
            "seeds where both finished, and the seeds the method won. Students of one seed start from the same "
            "weights and see the same batches in the same order, so these differences are paired.",
            "",
            "| teacher | student | " + " | ".join(label(m) for m in others) + " |",
            "|" + "|".join("---" for _ in range(len(others) + 2)) + "|",
        ]
        lines += [f"| {row['teacher']} | {row['student']} | "
                  + " | ".join(str(row.get(difference_column(m, reference), Difference(()))) for m in others) + " |"
                  for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, str | Stat]]) -> str:
    """Numbers rather than formatted text: `<column> mean`, `<column> std`, `<column> n` for each statistic, and
    `<column> wins` for a paired difference (`<method> vs <reference>`: the method minus the reference)."""
    keys = columns(rows)
    first = {key: next(row[key] for row in rows if key in row) for key in keys}  # each column's kind
    header: list[str] = []
    for key in keys:
        header += [key] if isinstance(first[key], str) else [f"{key} {part}" for part in csv_parts(first[key])]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        cells: list[Any] = []
        for key in keys:
            value = row.get(key, type(first[key])(()))
            cells += [value] if isinstance(value, str) else [getattr(value, part) for part in csv_parts(value)]
        writer.writerow(["" if cell is None else cell for cell in cells])
    return buffer.getvalue()


def csv_parts(value: Stat) -> tuple[str, ...]:
    """The numbers a statistic contributes to results.csv."""
    return ("mean", "std", "n", "wins") if isinstance(value, Difference) else ("mean", "std", "n")


def read_curve(out_dir: Path) -> list[float]:
    """Test accuracy by epoch from a finished run's metrics.jsonl."""
    if read_summary(out_dir) is None:
        return []
    return [json.loads(line)["test_acc"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def plot(sweep: Sweep, rows: list[dict[str, str | Stat]], out: Path) -> None:
    """Three figures, each method in its own colour throughout:

    curves.png: test accuracy by epoch per method (mean over seeds, min–max band), one panel per teacher;
    bars.png: the table as grouped bars with ±std error bars;
    gap.png (`gap_figure`): the paper's argument at a glance — final student accuracy against the teacher, in
    order of size, one line per method with its seed spread (the capacity gap: where KD falls off, DIH should
    not).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(sweep.teachers), figsize=(max(6.5, 5.0 * len(sweep.teachers)), 4), squeeze=False)
    for ax, teacher in zip(axes[0], sweep.teachers, strict=True):
        for student_index, student in enumerate(sweep.students):
            if teacher not in sweep.teachers_of(student):
                continue
            for method in sweep.methods:
                runs = [sweep.student_dir(student, method, teacher, seed) for seed in sweep.seeds]
                curves = [curve for run in runs if (curve := read_curve(run))]
                if not curves:
                    continue
                length = min(map(len, curves))
                stacked = np.array([c[:length] for c in curves])
                epochs = np.arange(1, length + 1)
                style = ("-", "--", ":", "-.")[student_index % 4]
                ax.plot(epochs, stacked.mean(0), style, color=colour(method),
                        label=f"{student} {label(method)} (n={len(curves)})")
                ax.fill_between(epochs, stacked.min(0), stacked.max(0), color=colour(method), alpha=0.15)
        ax.set(title=f"teacher {teacher}", xlabel="epoch", ylabel="test accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(f"{sweep.name}: students' test accuracy (mean over seeds, min–max band)", fontsize="medium")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    groups = [("teacher acc", "black", "teacher")] + [(label(m), colour(m), label(m)) for m in sweep.methods]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.4 * len(rows) * len(groups)), 4))
    width = 0.8 / len(groups)
    for i, (column, color, name) in enumerate(groups):
        stats = [row[column] for row in rows]
        ax.bar(np.arange(len(rows)) + i * width, [s.mean if s.n else np.nan for s in stats], width,
               yerr=[s.std or 0.0 for s in stats], capsize=2, color=color, label=name)
    ax.set_xticks(np.arange(len(rows)) + width * (len(groups) - 1) / 2,
                  [f"{row['teacher']} -> {row['student']}" for row in rows], rotation=30, ha="right")
    ax.set(ylabel="final test accuracy (%)", title=f"{sweep.name}: mean ± std over seeds")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(out / "bars.png", dpi=120)
    plt.close(fig)

    fig = gap_figure(sweep, rows)
    fig.savefig(out / "gap.png", dpi=120)
    plt.close(fig)


CLUSTER = 0.7  # how much of the space between two neighbouring teachers one teacher's methods take


def method_offsets(count: int) -> list[float]:
    """Where `count` methods sit around their teacher's position (teachers are 1 apart), in the methods' order."""
    if count < 2:
        return [0.0] * count
    return [CLUSTER * (i / (count - 1) - 0.5) for i in range(count)]


def millions(parameters: int) -> str:
    """A parameter count as gap.png labels it: 1.73M."""
    return f"{parameters / 1e6:.2f}M"


def gap_figure(sweep: Sweep, rows: list[dict[str, str | Stat]]) -> Figure:
    """gap.png: each method's final student accuracy against the teacher, teachers in order of size, with the
    seed spread; the methods side by side at each teacher (`method_offsets`).

    The teachers are evenly spaced by rank, not placed on a log-parameter axis: the paper's teachers include
    near-equal sizes (WRN-28-2 1.47M and ResNet-110 1.73M parameters, 0.07 decades apart), where nine methods
    side by side on a log axis would get a pixel or two each. Each teacher's name and parameter count label its
    position, below the axes, and the legend sits outside them: neither covers a point. (Counts are those of the
    10-class model, `parameter_count`: the order is what matters.)
    """
    import matplotlib.pyplot as plt
    import numpy as np

    size = {teacher: parameter_count(teacher) for teacher in sweep.teachers}
    offsets = dict(zip(sweep.methods, method_offsets(len(sweep.methods)), strict=True))
    width = max(6.5, 3.5 + 1.0 * len(sweep.teachers))
    fig, axes = plt.subplots(1, len(sweep.students), figsize=(width * len(sweep.students), 4.5), squeeze=False)
    for ax, student in zip(axes[0], sweep.students, strict=True):
        ordered = sorted((row for row in rows if row["student"] == student), key=lambda row: size[row["teacher"]])
        x = np.arange(len(ordered), dtype=float)
        for method in sweep.methods:
            stats = [row[label(method)] for row in ordered]
            mean = np.array([s.mean if s.n else np.nan for s in stats])
            if np.isnan(mean).all():
                continue
            spread = np.array([s.std or 0.0 for s in stats])
            ax.errorbar(x + offsets[method], mean, yerr=spread, color=colour(method), marker="o", markersize=4,
                        capsize=2, elinewidth=1, label=label(method),
                        linestyle="--" if method == "ce" else "-")  # CE has no teacher: its line is flat
        ax.set_xticks(x, [f"{row['teacher']}\n{millions(size[row['teacher']])}" for row in ordered],
                      fontsize="small")
        ax.set_xlim(-0.6, len(ordered) - 0.4)
        ax.set(title=f"student {student}", xlabel="teacher, by parameter count",
               ylabel="student's final test accuracy (%)")
        if ax.containers:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{sweep.name}: the capacity gap (mean ± std over seeds)", fontsize="medium")
    fig.tight_layout()
    return fig


def literature(sweep: Sweep, rows: list[dict[str, str | Stat]], out: Path) -> str:
    """The published numbers beside ours (sweep/published.py): literature.csv, and a section for results.md."""
    lines = published.comparison(published.read_published(sweep.published), rows, sweep.methods, label)
    atomic_write_text(out / "literature.csv", published.to_csv(lines))
    path = sweep.published.resolve()
    made_on = next((preset["dataset"] for preset in PRESETS.values()
                    if preset.get("published") is not None and preset["published"].resolve() == path),
                   None)  # a preset's file: its dataset; a file of the user's: not known
    return published.to_markdown(lines, sweep.published, sweep.dataset, made_on)


def report(sweep: Sweep) -> str:
    """Write results.md, results.csv and the plots (and literature.csv where the sweep has published numbers to
    compare with) from whatever runs exist; return the markdown."""
    rows = aggregate(sweep)
    out = sweep.results_dir / sweep.name
    table = to_markdown(sweep, rows)
    if sweep.published is not None:
        table += "\n" + literature(sweep, rows, out)
    atomic_write_text(out / "results.md", table)
    atomic_write_text(out / "results.csv", to_csv(rows))
    plot(sweep, rows, out)
    return table
