"""Exercises and their checks: the registry the in-notebook checks and the grader share.

Each lab's checks live in ``detlib/grade/checks/labNN.py`` and register themselves with
:func:`exercise`.  A check receives the learner's object (usually a function) and raises
:class:`~detlib.grade.harness.CheckFailed` when the answer is wrong.
"""

from __future__ import annotations

import importlib
import sysconfig
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from detlib.grade.guard import ReferenceCalled, forbid
from detlib.grade.harness import CheckFailed

Status = Literal["passed", "failed", "not attempted", "error", "timeout", "forbidden call", "missing"]


@dataclass(frozen=True)
class Exercise:
    """One graded exercise: the learner writes ``name`` in a cell tagged ``exercise`` of lab ``lab``."""

    lab: str
    name: str
    points: int
    check: Callable[[Any], None]
    replaces: tuple[str, ...] = ()
    timeout_s: float = 60.0
    hint: str = ""

    @property
    def key(self) -> str:
        return f"{self.lab}.{self.name}"


@dataclass
class Result:
    """The verdict on one exercise, as printed in a scorecard and written to the LMS JSON."""

    key: str
    status: Status
    points: float
    max_points: int
    reason: str = ""
    hint: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


REGISTRY: dict[str, Exercise] = {}


def exercise(
    lab: str, name: str, *, points: int = 1, replaces: tuple[str, ...] = (), timeout_s: float = 60.0, hint: str = ""
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Register the decorated function as the check of exercise ``lab.name``."""

    def register(check: Callable[[Any], None]) -> Callable[[Any], None]:
        ex = Exercise(lab, name, points, check, tuple(replaces), timeout_s, hint)
        REGISTRY[ex.key] = ex
        return check

    return register


def lab_exercises(lab: str) -> list[Exercise]:
    """The exercises of one lab, in the order the lab presents them.

    A lab without a ``checks/labNN.py`` module has only the exercises registered elsewhere (e.g. by a
    test-only check module the grader imported), usually none.
    """
    try:
        importlib.import_module(f"detlib.grade.checks.lab{lab}")
    except ModuleNotFoundError as err:
        if err.name != f"detlib.grade.checks.lab{lab}":
            raise
    return [ex for ex in REGISTRY.values() if ex.lab == lab]


def find(key: str) -> Exercise:
    """Look an exercise up by its key, e.g. ``"01.pairwise_sum"``."""
    lab = key.split(".", 1)[0]
    lab_exercises(lab)
    if key not in REGISTRY:
        known = ", ".join(sorted(k for k in REGISTRY if k.startswith(lab + "."))) or "none"
        raise KeyError(f"no exercise {key!r}; lab {lab} has: {known}")
    return REGISTRY[key]


_LIBRARY_DIRS = tuple(
    {str(Path(p).resolve()) for p in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
                                      sysconfig.get_paths()["platlib"], Path(__file__).resolve().parents[1])}
)


def _learner_frame(err: BaseException) -> traceback.FrameSummary:
    """The innermost frame of ``err`` in the learner's code (not in Python, its packages or detlib), else the last."""
    frames = traceback.extract_tb(err.__traceback__)
    own = [f for f in frames if not str(Path(f.filename).resolve()).startswith(_LIBRARY_DIRS)]
    return (own or frames)[-1]


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def run_check(ex: Exercise, candidate: Any) -> Result:
    """Run ``ex``'s check on the learner's ``candidate`` in this process and return a verdict.

    Time limits and output caps are the grader's job (it runs this in a child process); here every
    Python-level failure becomes a clear verdict.
    """
    start = time.perf_counter()

    def verdict(status: Status, reason: str = "", hint: str = "", points: float = 0.0) -> Result:
        return Result(ex.key, status, points, ex.points, reason, hint or (ex.hint if status != "passed" else ""),
                      time.perf_counter() - start)

    if candidate is None:
        return verdict("missing", f"`{ex.name}` is not defined", f"define `{ex.name}` in the exercise cell")
    with forbid(ex.replaces) as forbidden_calls:
        try:
            ex.check(candidate)
        except NotImplementedError:
            return verdict("not attempted", "the exercise still raises NotImplementedError")
        except ReferenceCalled as err:
            return verdict("forbidden call", str(err), "the point is to write it yourself")
        except CheckFailed as err:
            if forbidden_calls:
                return verdict("forbidden call", f"called {forbidden_calls[0]}", "the point is to write it yourself")
            return verdict("failed", err.reason, err.hint or "")
        except RecursionError:
            return verdict("error", "RecursionError: maximum recursion depth exceeded", "check your base case")
        except Exception as err:  # the learner's code may raise anything
            if "NotImplementedError" in str(err):  # a stub inside a @triton.jit kernel fails to compile on a GPU
                return verdict("not attempted", "the exercise still raises NotImplementedError")
            if forbidden_calls:
                return verdict("forbidden call", f"called {forbidden_calls[0]}", "the point is to write it yourself")
            where = _learner_frame(err)
            return verdict("error", f"{_one_line(err)} (line {where.lineno} of {where.name})")
    if forbidden_calls:
        return verdict("forbidden call", f"called {forbidden_calls[0]}", "the point is to write it yourself")
    return verdict("passed", points=ex.points)
