"""Mark detlib functions as the reference solution of an exercise, so the grader can forbid calling them.

A graded function must be the learner's own work: while an exercise is checked, the references it
replaces raise :class:`ReferenceCalled` and the call is recorded, even if the learner's code catches
the exception.  Outside grading, a reference behaves exactly like the function it wraps.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

_state = threading.local()


class ReferenceCalled(RuntimeError):
    """A graded function called the detlib reference it is meant to replace."""


def _forbidden() -> frozenset[str]:
    return getattr(_state, "forbidden", frozenset())


def _calls() -> list[str]:
    if not hasattr(_state, "calls"):
        _state.calls = []
    return _state.calls


def reference_name(fn: Callable[..., object]) -> str:
    """The name exercises use to forbid ``fn``: ``module.qualname``."""
    return f"{fn.__module__}.{fn.__qualname__}"


def reference(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a detlib function that is the reference solution of some exercise."""
    name = reference_name(fn)

    @functools.wraps(fn)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        if name in _forbidden():
            _calls().append(name)
            raise ReferenceCalled(f"{name} is the reference this exercise replaces; write your own")
        return fn(*args, **kwargs)

    guarded.__detlib_reference__ = name  # type: ignore[attr-defined]
    return guarded


@contextmanager
def forbid(names: Iterable[str]) -> Iterator[list[str]]:
    """Within the block, calls to the named references fail; yields the list of attempted calls."""
    previous, previous_calls = _forbidden(), list(_calls())
    _state.forbidden = previous | frozenset(names)
    _state.calls = []
    try:
        yield _state.calls
    finally:
        _state.forbidden = previous
        _state.calls = previous_calls
