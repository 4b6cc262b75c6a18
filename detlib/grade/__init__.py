"""Exercise checks and the autograder.

In a notebook, right after an exercise::

    from detlib.grade import check
    check("01.pairwise_sum", pairwise_sum)

From the shell, ``python -m detlib.grade PATH... [--json FILE]`` grades notebooks or folders of them,
each exercise in its own process with a time limit.
"""

from __future__ import annotations

from typing import Any

from detlib.grade.guard import ReferenceCalled, reference
from detlib.grade.harness import CheckFailed
from detlib.grade.report import format_result
from detlib.grade.spec import Exercise, Result, exercise, find, lab_exercises, run_check

__all__ = [
    "CheckFailed",
    "Exercise",
    "ReferenceCalled",
    "Result",
    "check",
    "exercise",
    "find",
    "lab_exercises",
    "reference",
    "run_check",
]


def check(key: str, candidate: Any) -> None:
    """Check the learner's ``candidate`` for exercise ``key`` here and now, and print the verdict.

    Returns nothing, so a check cell shows only the verdict; use :func:`run_check` for the result object.
    """
    print(format_result(run_check(find(key), candidate)))
