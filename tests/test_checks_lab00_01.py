"""The checks of labs 00 and 01: detlib's reference passes, planted mistakes fail, calling the reference is caught."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import detlib
from detlib import numerics, summation
from detlib.grade import find, lab_exercises, run_check


def _verdict(key: str, fn: Any) -> tuple[str, str]:
    res = run_check(find(key), fn)
    return res.status, res.reason


def test_the_labs_register_their_exercises_in_lab_order() -> None:
    assert [ex.key for ex in lab_exercises("00")] == ["00.bits_equal"]
    assert [ex.key for ex in lab_exercises("01")] == [
        "01.sequential_sum", "01.count_distinct_sums", "01.pairwise_sum", "01.blocked_sum"]
    assert find("00.bits_equal").replaces == ("detlib.numerics.bitwise_equal",)


# The references themselves, unguarded (the guarded ones are what a learner must not call).
REFERENCES: dict[str, Callable[..., Any]] = {
    "00.bits_equal": numerics.bitwise_equal.__wrapped__,
    "01.sequential_sum": summation.sequential_sum.__wrapped__,
    "01.count_distinct_sums": summation.count_distinct_sums.__wrapped__,
    "01.pairwise_sum": summation.pairwise_sum.__wrapped__,
    "01.blocked_sum": summation.blocked_sum.__wrapped__,
}

GUARDED: dict[str, Callable[..., Any]] = {
    "00.bits_equal": lambda a, b: detlib.bitwise_equal(a, b),
    "01.sequential_sum": lambda x, dtype: summation.sequential_sum(x, dtype),
    "01.count_distinct_sums": lambda x, orders, dtype: summation.count_distinct(
        summation.sums_over_orders(x, orders, dtype=dtype)),
    "01.pairwise_sum": lambda x, dtype: summation.pairwise_sum(x, dtype),
    "01.blocked_sum": lambda x, block, dtype: summation.blocked_sum(x, block, dtype),
}


def _halving(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return x[0] if x.numel() == 1 else _halving(x[: x.numel() // 2], dtype) + _halving(x[x.numel() // 2 :], dtype)


def _value_count(x: torch.Tensor, orders: torch.Tensor, dtype: torch.dtype) -> int:
    return int(torch.unique(summation.sums_over_orders(x, orders, dtype=dtype)).numel())  # NaNs all distinct


MISTAKES: list[tuple[str, Callable[..., Any], str]] = [
    ("00.bits_equal", lambda a, b: bool(torch.equal(a, b)), "0.0 and -0.0"),
    ("00.bits_equal", lambda a, b: bool(torch.equal(a.double(), b.double())), "0.0 and -0.0"),
    ("00.bits_equal", lambda a, b: numerics.bitwise_equal.__wrapped__(a, b) or a.dtype != b.dtype, "dtype"),
    ("01.sequential_sum", lambda x, dtype: x.to(dtype).sum(), "not bitwise equal"),
    ("01.sequential_sum", lambda x, dtype: x.double().sum().to(dtype), "not bitwise equal"),
    ("01.sequential_sum", lambda x, dtype: summation.sequential_sum.__wrapped__(x, torch.float32).to(dtype),
     "not bitwise equal"),
    ("01.count_distinct_sums", _value_count, "NaN"),
    ("01.count_distinct_sums", lambda x, orders, dtype: 1, "expected"),
    ("01.pairwise_sum", lambda x, dtype: summation.sequential_sum.__wrapped__(x, dtype), "not bitwise equal"),
    ("01.pairwise_sum", _halving, "not bitwise equal"),
    ("01.blocked_sum", lambda x, block, dtype: summation.sequential_sum.__wrapped__(x, dtype), "not bitwise equal"),
    ("01.blocked_sum", lambda x, block, dtype: summation.blocked_sum.__wrapped__(x, block + 1, dtype),
     "not bitwise equal"),
]


@pytest.mark.parametrize("key", list(REFERENCES))
def test_reference_passes(key: str) -> None:
    assert _verdict(key, REFERENCES[key]) == ("passed", "")


@pytest.mark.parametrize("key,wrong,reason", MISTAKES)
def test_planted_mistake_fails(key: str, wrong: Callable[..., Any], reason: str) -> None:
    status, why = _verdict(key, wrong)
    assert status == "failed"
    assert reason in why


@pytest.mark.parametrize("key", list(GUARDED))
def test_calling_the_reference_is_a_forbidden_call(key: str) -> None:
    status, why = _verdict(key, GUARDED[key])
    assert status == "forbidden call"
    assert "reference" in why or "called" in why


def test_results_of_the_wrong_type_fail_with_a_clear_reason() -> None:
    status, why = _verdict("00.bits_equal", lambda a, b: torch.tensor(numerics.bitwise_equal.__wrapped__(a, b)))
    assert status == "failed" and "Python bool" in why
    status, why = _verdict("01.count_distinct_sums",
                           lambda x, o, d: torch.tensor(summation.count_distinct_sums.__wrapped__(x, o, d)))
    assert status == "failed" and "Python int" in why
    status, why = _verdict("01.sequential_sum", lambda x, dtype: summation.sequential_sum.__wrapped__(x, dtype).item())
    assert status == "failed" and "torch.Tensor" in why
    status, why = _verdict("01.pairwise_sum", lambda x, dtype: summation.pairwise_sum.__wrapped__(x, dtype)[None])
    assert status == "failed" and "shape" in why


def test_a_usual_mistake_is_named() -> None:
    _, why = _verdict("01.sequential_sum", lambda x, dtype: x.double().sum().to(dtype))
    assert "float64 sum rounded once" in why


def test_mutating_the_input_fails() -> None:
    def clobber(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = summation.sequential_sum.__wrapped__(x, dtype)
        x.zero_()
        return out

    status, why = _verdict("01.sequential_sum", clobber)
    assert status == "failed" and "in place" in why


def test_a_stub_is_not_attempted() -> None:
    def stub(*args: Any) -> Any:
        raise NotImplementedError("write your code here")

    for key in REFERENCES:
        assert _verdict(key, stub)[0] == "not attempted"
