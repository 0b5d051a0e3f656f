"""Published accuracies beside ours: a small data file that names each number's source, and the comparison.

The file (e.g. sweep/published/repdistiller_cifar100.csv) has one row per number: `teacher`, `student` (our model
names), `method` (`teacher` for the teacher's own accuracy, `ce` for the student trained alone, else a method),
`accuracy` (empty where nothing is published, the source saying so), `measure` and `source` (repository, file,
commit, table, row and column). `measure` says which of our numbers is comparable:

- `final`: the last epoch's test accuracy, our headline. RepDistiller's numbers are its last epoch's (its author,
  HobbitLong/RepDistiller issue #16); its README does not say over how many runs.
- `best-mean`: the best epoch's, averaged over runs: mdistiller's DKD numbers are the mean over 5 runs of each
  run's best epoch (its maintainers, megvii-research/mdistiller issues #30 and #42). Ours: the `best epoch` column.
- `best`: the best epoch's of a run, the number of runs not stated or one: torchdistill tests the checkpoint of its
  best validation accuracy, mdistiller's trainer reports its best epoch (ImageNet). Ours: the `best epoch` column.

A method may have several published numbers (an original paper's and a reproduction's): one row each, each with its
source, each compared with ours.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import UserError

FIELDS = ("teacher", "student", "method", "accuracy", "measure", "source")
MEASURES = {"final": "final epoch", "best-mean": "best epoch, mean of runs", "best": "best epoch"}


@dataclass(frozen=True)
class Published:
    teacher: str
    student: str
    method: str
    accuracy: float | None
    measure: str
    source: str


def read_published(path: Path) -> list[Published]:
    """The file's numbers, each checked to have its measure and source; a malformed file is one UserError."""
    try:
        rows = list(csv.DictReader(path.open(newline="")))
    except OSError as err:
        raise UserError(f"--published: cannot read {path} ({err.strerror})") from None
    if not rows or tuple(rows[0]) != FIELDS:
        raise UserError(f"--published: {path} needs the columns {', '.join(FIELDS)}")
    entries = []
    for line, row in enumerate(rows, 2):
        try:
            accuracy = float(row["accuracy"]) if row["accuracy"].strip() else None
        except ValueError:
            raise UserError(f"--published: {path} line {line}: accuracy {row['accuracy']!r} is not a number") from None
        if row["measure"] not in MEASURES or not row["source"].strip():
            raise UserError(f"--published: {path} line {line}: a measure ({', '.join(MEASURES)}) and a source are "
                            "needed for every number")
        entries.append(Published(row["teacher"], row["student"], row["method"], accuracy, row["measure"],
                                 row["source"]))
    return entries


def ours(row: dict[str, Any], method: str, measure: str, label: str) -> Any:
    """Our statistic (a report `Stat`) comparable with a published number, from the report's row of its pair."""
    if method == "teacher":
        return row.get("teacher acc")
    return row.get(label if measure == "final" else f"{label} best epoch")


def comparison(published: list[Published], rows: list[dict[str, Any]], methods: list[str],
               label: Any) -> list[dict[str, Any]]:
    """One line per published number of a pair and method (or the teacher) in the sweep: published, ours, Δ."""
    by_pair = {(row["teacher"], row["student"]): row for row in rows}
    lines = []
    for entry in published:
        row = by_pair.get((entry.teacher, entry.student))
        if row is None or entry.method not in ("teacher", *methods):
            continue
        name = "teacher" if entry.method == "teacher" else label(entry.method)
        stat = ours(row, entry.method, entry.measure, name)
        mean = stat.mean if stat is not None and stat.n else None
        difference = None if mean is None or entry.accuracy is None else mean - entry.accuracy
        lines.append({"entry": entry, "name": name, "ours": stat, "difference": difference})
    return lines


def shown(path: Path) -> str:
    """A data file of this repository by its path in the repository; any other as given."""
    root = Path(__file__).resolve().parents[1]
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)


def to_markdown(lines: list[dict[str, Any]], path: Path, dataset: str, published_dataset: str | None = None) -> str:
    """The comparison as a section of results.md; the source column names the document (the data file and
    literature.csv give its table, row and column too). `published_dataset`: the dataset the numbers were made on,
    where known (a preset's file), to flag a sweep on other data."""
    text = [
        "## Against the literature: published numbers beside ours",
        "",
        "`ours − published`: our mean minus the published number, in points; a published number is compared with "
        "the measure it was made with (final epoch, or the best epoch's mean over runs). Each number's source "
        f"(repository, file, commit, table, row, column) is in {shown(path)} and in literature.csv.",
    ]
    if published_dataset is not None and dataset != published_dataset:
        text.append(f"**This sweep ran on {dataset}, the published numbers are for {published_dataset}: the "
                    "differences compare different data.**")
    text += ["", "| teacher → student | method | published | measure | ours | ours − published | source |",
             "|---|---|---|---|---|---|---|"]
    for line in lines:
        entry = line["entry"]
        published = "not published" if entry.accuracy is None else f"{entry.accuracy:.2f}"
        difference = "—" if line["difference"] is None else f"{line['difference']:+.2f}"
        ours_text = str(line["ours"]) if line["ours"] is not None else "—"
        document = entry.source.split(", ", 1)[0]
        text.append(f"| {entry.teacher} → {entry.student} | {line['name']} | {published} | {MEASURES[entry.measure]} "
                    f"| {ours_text} | {difference} | {document} |")
    return "\n".join(text) + "\n"


def to_csv(lines: list[dict[str, Any]]) -> str:
    """The comparison as numbers: published, our mean, std and n, the difference, the measure and the source."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["teacher", "student", "method", "published", "measure", "ours mean", "ours std", "ours n",
                     "ours - published", "source"])
    for line in lines:
        entry, stat = line["entry"], line["ours"]
        cells = [entry.teacher, entry.student, entry.method, entry.accuracy, entry.measure,
                 stat.mean if stat is not None else None, stat.std if stat is not None else None,
                 stat.n if stat is not None else 0, line["difference"], entry.source]
        writer.writerow(["" if cell is None else cell for cell in cells])
    return buffer.getvalue()
