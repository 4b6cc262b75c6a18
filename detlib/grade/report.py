"""How verdicts are shown: one line per exercise in a notebook, a scorecard, the LMS JSON and the batch CSV."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from detlib.grade.spec import Result

if TYPE_CHECKING:
    from detlib.grade.runner import NotebookReport

_MARK = {"passed": "PASS", "not attempted": "TODO"}
CSV_HEADER = ("learner", "lab", "exercise", "points", "max_points", "status", "reason")


def format_result(res: Result) -> str:
    """One or two lines for the instant check right after an exercise."""
    mark = _MARK.get(res.status, "FAIL")
    line = f"[{mark}] {res.key}: {res.status} ({res.points:g}/{res.max_points} points)"
    if res.reason:
        line += f" — {res.reason}"
    if res.hint and res.status != "passed":
        line += f"\n       hint: {res.hint}"
    for note in res.notes:
        line += f"\n       note: {note}"
    return line


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def scorecard(report: NotebookReport) -> str:
    """A notebook's table: exercise, points, verdict with its reason in one line, hint and notes, total."""
    who = f" — {report.learner}" if report.learner else ""
    lab = f"lab {report.lab}" if report.lab else "no lab"
    lines = [f"{report.path} ({lab}){who}"]
    if report.message and not report.results:  # otherwise each result repeats it
        lines.append(f"  {report.message}")
    if report.results:
        width = max(len("exercise"), *(len(r.key) for r in report.results))
        lines.append(f"  {'exercise':<{width}}  {'points':>7}  verdict")
        pad = " " * (width + 13)
        for r in report.results:
            verdict = r.status + (f": {_one_line(r.reason)}" if r.reason else "")
            lines.append(f"  {r.key:<{width}}  {f'{r.points:g}/{r.max_points}':>7}  {verdict}")
            if r.hint and r.status != "passed":
                lines.append(f"{pad}hint: {_one_line(r.hint, 300)}")
            lines += [f"{pad}note: {_one_line(n)}" for n in r.notes]
    lines.append(f"  total: {report.score:g}/{report.max_score} points")
    return "\n".join(lines)


def _test_output(r: Result) -> str:
    parts = [f"{r.status}: {r.reason}" if r.reason else r.status]
    if r.hint and r.status != "passed":
        parts.append(f"hint: {r.hint}")
    parts += [f"note: {n}" for n in r.notes]
    return "\n".join(parts)


def _test_prefix(rep: NotebookReport, reports: Sequence[NotebookReport]) -> str:
    """What tells this notebook's tests apart from the others': nothing, its file name, or its path."""
    if len(reports) == 1:
        return ""
    same_name = sum(other.path.name == rep.path.name for other in reports)
    return f"{rep.path.name}: " if same_name == 1 else f"{rep.path}: "


def gradescope(reports: Sequence[NotebookReport]) -> dict[str, Any]:
    """Gradescope's ``results.json``: total score, one test per exercise, and the scorecards as output."""
    tests = [
        {"name": _test_prefix(rep, reports) + r.key, "score": r.points, "max_score": r.max_points,
         "status": "passed" if r.status == "passed" else "failed", "output": _test_output(r)}
        for rep in reports for r in rep.results
    ]
    return {
        "score": sum(rep.score for rep in reports),
        "max_score": sum(rep.max_score for rep in reports),
        "output": "\n\n".join(scorecard(rep) for rep in reports),
        "tests": tests,
    }


def csv_rows(reports: Sequence[NotebookReport]) -> list[tuple[str, ...]]:
    """One row per learner and exercise (a notebook without exercises gets one row saying why)."""
    rows = []
    for rep in reports:
        for r in rep.results:
            rows.append((rep.learner, rep.lab or "", r.key.split(".", 1)[-1], f"{r.points:g}", str(r.max_points),
                         r.status, _one_line(r.reason, 300)))
        if not rep.results:
            rows.append((rep.learner, rep.lab or "", "", "0", "0", "not graded", rep.message))
    return rows


def batch_summary(reports: Sequence[NotebookReport]) -> str:
    """Per learner: points, maximum, exercises passed, and how many of each other verdict."""
    learners: dict[str, list[Result]] = {}
    for rep in reports:
        learners.setdefault(rep.learner, []).extend(rep.results)
    width = max([len("learner"), *(len(name) for name in learners)])
    lines = [f"{'learner':<{width}}  {'points':>9}  {'passed':>7}  other verdicts"]
    for name, results in learners.items():
        score, top = sum(r.points for r in results), sum(r.max_points for r in results)
        passed = sum(r.status == "passed" for r in results)
        others: dict[str, int] = {}
        for r in results:
            if r.status != "passed":
                others[r.status] = others.get(r.status, 0) + 1
        other = ", ".join(f"{n} {status}" for status, n in sorted(others.items())) or "-"
        lines.append(f"{name:<{width}}  {f'{score:g}/{top}':>9}  {f'{passed}/{len(results)}':>7}  {other}")
    return "\n".join(lines)
