"""How verdicts are shown: one line per exercise in a notebook, a scorecard, and the LMS JSON."""

from __future__ import annotations

from detlib.grade.spec import Result

_MARK = {"passed": "PASS", "not attempted": "TODO"}


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
