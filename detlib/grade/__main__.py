"""Grade notebooks from the shell and print a scorecard per notebook.

    python -m detlib.grade labs/01_float_order.ipynb --json results.json    # one learner (Gradescope)
    python -m detlib.grade submissions/ --batch --csv grades.csv            # one sub-folder per learner

The exit code is 0 whenever grading completed, whatever the score; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
from pathlib import Path

from detlib.grade.notebook import find_notebooks
from detlib.grade.report import CSV_HEADER, batch_summary, csv_rows, gradescope, scorecard
from detlib.grade.runner import NotebookReport, grade
from detlib.grade.spec import Result, lab_exercises


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m detlib.grade", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="notebooks, or folders searched for *.ipynb")
    p.add_argument("--json", type=Path, metavar="FILE", help="write Gradescope's results.json here")
    p.add_argument("--csv", type=Path, metavar="FILE", help="write one row per learner and exercise here")
    p.add_argument("--batch", action="store_true",
                   help="PATH is a folder with one sub-folder per learner; print a summary table")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="exercises graded at once (default: the number of CPUs)")
    p.add_argument("--timeout-scale", type=float, default=1.0, metavar="X",
                   help="multiply every exercise's time limit by X (e.g. 3 on a slow machine)")
    return p


def _learners(root: Path) -> list[tuple[str, list[Path]]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [(f.name, find_notebooks(f)) for f in folders]


def _fill_missing(reports: list[NotebookReport], learners: list[tuple[str, list[Path]]], root: Path) -> None:
    """Give each learner a ``missing`` row for every exercise of a lab others submitted and they did not."""
    labs = sorted({r.lab for r in reports if r.lab and r.results})
    for name, _ in learners:
        have = {r.lab for r in reports if r.learner == name}
        for lab in (lab for lab in labs if lab not in have):
            results = [Result(ex.key, "missing", 0.0, ex.points, f"no notebook of lab {lab} in the submission",
                              ex.hint) for ex in lab_exercises(lab)]
            reports.append(NotebookReport(root / name, lab, results, f"no notebook of lab {lab} found", name))
        if not have and not labs:
            reports.append(NotebookReport(root / name, None, [], "no notebooks found", name))
    order = {name: i for i, (name, _) in enumerate(learners)}
    reports.sort(key=lambda r: (order[r.learner], r.lab or "", str(r.path)))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.timeout_scale <= 0:
        parser.error("--jobs must be at least 1 and --timeout-scale positive")
    for path in args.paths:
        if not path.exists():
            parser.error(f"{path}: no such file or folder")
    if args.batch:
        if len(args.paths) != 1 or not args.paths[0].is_dir():
            parser.error("--batch takes one folder holding one sub-folder per learner")
        learners = _learners(args.paths[0])
        if not learners:
            parser.error(f"{args.paths[0]}: no learner sub-folders")
        pairs = [(nb, name) for name, notebooks in learners for nb in notebooks]
    else:
        unique: dict[Path, Path] = {}  # a notebook named twice (labs/ labs/01_x.ipynb) is graded once
        for path in args.paths:
            for nb in find_notebooks(path):
                unique.setdefault(nb.resolve(), nb)
        pairs = [(nb, "") for nb in unique.values()]
        if not pairs:
            parser.error("no notebooks (*.ipynb) found in " + ", ".join(map(str, args.paths)))

    lock, done = threading.Lock(), [0]

    def progress(report: NotebookReport, res: Result) -> None:
        with lock:
            done[0] += 1
            who = f"{report.learner} " if report.learner else ""
            print(f"[{done[0]}] {who}{res.key}: {res.status}", file=sys.stderr, flush=True)

    reports = grade(pairs, timeout_scale=args.timeout_scale, jobs=args.jobs, on_result=progress)
    if args.batch:
        _fill_missing(reports, learners, args.paths[0])
    for report in reports:
        print(scorecard(report), end="\n\n")
    if args.batch:
        print(batch_summary(reports))
    for out in (args.json, args.csv):
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        payload = ({"learners": {name: gradescope([r for r in reports if r.learner == name]) for name, _ in learners}}
                   if args.batch else gradescope(reports))
        args.json.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    if args.csv:
        with args.csv.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_HEADER)
            writer.writerows(csv_rows(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
