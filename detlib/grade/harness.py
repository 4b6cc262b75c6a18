"""Building blocks for exercise checks: call the learner's code safely and compare what comes back.

Every helper raises :class:`CheckFailed` with a one-line reason a learner can act on (which input,
which shape, which bits) and, where useful, a hint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from detlib.numerics import bitwise_equal, diff_summary


class CheckFailed(AssertionError):
    """The learner's answer is wrong; ``reason`` says how, ``hint`` what to look at."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


def _snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (list, tuple, dict)):
        return copy.deepcopy(value)
    return None


def _unchanged(before: Any, after: Any) -> bool:
    if isinstance(before, torch.Tensor):
        return bitwise_equal(before, after.detach())
    if isinstance(before, np.ndarray):
        return before.shape == after.shape and before.tobytes() == after.tobytes()
    if isinstance(before, (list, tuple, dict)):
        try:
            return bool(before == after)
        except Exception:  # containers of tensors: compare element by element
            return all(_unchanged(b, a) for b, a in zip(before, after, strict=True))
    return True


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the learner's ``fn`` and fail if it changed any of its inputs in place."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"argument {k!r}", v) for k, v in kwargs.items()]
    before = [(label, value, _snapshot(value)) for label, value in named]
    out = fn(*args, **kwargs)
    for label, value, snap in before:
        if snap is not None and not _unchanged(snap, value):
            raise CheckFailed(
                f"your function changed its input ({label}) in place",
                "work on a copy (x.clone()) or write results to a new tensor",
            )
    return out


def expect_tensor(
    out: Any,
    *,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    what: str = "the result",
    allow_nan: bool = False,
) -> torch.Tensor:
    """Fail unless ``out`` is a tensor of the given shape, dtype and device, free of NaN."""
    if not isinstance(out, torch.Tensor):
        raise CheckFailed(f"{what} should be a torch.Tensor, got {type(out).__name__}", "return a tensor")
    if tuple(out.shape) != tuple(shape):
        raise CheckFailed(f"{what} has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if dtype is not None and out.dtype != dtype:
        raise CheckFailed(f"{what} has dtype {out.dtype}, expected {dtype}",
                          "accumulate in float32 if you like, but return the dtype asked for")
    if device is not None and out.device.type != torch.device(device).type:
        raise CheckFailed(f"{what} is on {out.device}, expected {device}")
    if not allow_nan and out.is_floating_point() and bool(torch.isnan(out).any()):
        n = int(torch.isnan(out).sum())
        raise CheckFailed(f"{what} contains {n} NaN value(s)", "look for 0/0, an unmasked load or uninitialised memory")
    return out


def expect_bits(out: torch.Tensor, want: torch.Tensor, *, what: str = "the result", hint: str | None = None) -> None:
    """Fail unless ``out`` has exactly the bits of ``want``, saying where they first differ."""
    expect_tensor(out, shape=want.shape, dtype=want.dtype, what=what, allow_nan=bool(torch.isnan(want).any())
                  if want.is_floating_point() else False)
    if not bitwise_equal(out, want):
        raise CheckFailed(f"{what} is not bitwise equal to the expected one: {diff_summary(out, want)}", hint)


def expect_close(
    out: torch.Tensor, want: torch.Tensor, *, rtol: float, atol: float, what: str = "the result", hint: str | None = None
) -> None:
    """Fail unless ``out`` matches ``want`` (usually a float64 reference) within the stated tolerance."""
    expect_tensor(out, shape=want.shape, what=what)
    got, ref = out.detach().double().cpu(), want.detach().double().cpu()
    err = (got - ref).abs()
    bound = atol + rtol * ref.abs()
    if bool((err > bound).any()):
        idx = tuple(int(i) for i in (err > bound).nonzero()[0])
        raise CheckFailed(
            f"{what} is off at index {idx}: got {float(got[idx]):.6g}, expected {float(ref[idx]):.6g} "
            f"(max error {float(err.max()):.3g}, tolerance {atol:g} + {rtol:g}·|expected|)",
            hint,
        )


def expect_equal(got: Any, want: Any, *, what: str = "the result", hint: str | None = None) -> None:
    """Fail unless a plain Python value equals the expected one (floats compared bit for bit)."""
    if isinstance(want, float) and isinstance(got, (float, np.floating)):
        same = math.isnan(want) and math.isnan(float(got)) or float(got).hex() == want.hex()
    else:
        same = type(got) is type(want) and got == want if isinstance(want, bool) else got == want
    if not same:
        raise CheckFailed(f"{what}: got {got!r}, expected {want!r}", hint)
