"""Bitwise comparison, ulp distance and difference summaries."""

from __future__ import annotations

import pytest
import torch

from detlib.numerics import bitwise_equal, diff_summary, ulp_distance

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", FLOATS)
def test_bitwise_equal_sees_bits_not_values(dtype: torch.dtype) -> None:
    x = torch.tensor([1.0, 0.0, float("nan"), -2.5], dtype=dtype)
    assert bitwise_equal(x, x.clone())  # NaN equals the same NaN bits; torch.equal says no
    assert not torch.equal(x, x.clone())
    y = x.clone()
    y[1] = -0.0  # equal as values, different bits
    assert torch.equal(x[:2], y[:2])
    assert not bitwise_equal(x, y)


def test_bitwise_equal_needs_same_shape_and_dtype() -> None:
    x = torch.ones(4)
    assert not bitwise_equal(x, torch.ones(2, 2))
    assert not bitwise_equal(x, torch.ones(4, dtype=torch.float64))


def test_bitwise_equal_on_non_contiguous_views() -> None:
    x = torch.randn(8, 8)
    assert bitwise_equal(x.t(), x.t().contiguous())


@pytest.mark.parametrize("dtype", FLOATS)
def test_ulp_distance_counts_neighbours(dtype: torch.dtype) -> None:
    one = torch.tensor([1.0], dtype=dtype)
    two = torch.tensor([2.0], dtype=dtype)
    nxt = one + torch.finfo(dtype).eps  # the next float after 1.0 in this dtype
    assert ulp_distance(one, nxt).item() == 1
    assert ulp_distance(one, one).item() == 0


def test_ulp_distance_across_zero_and_nan() -> None:
    tiny = torch.tensor([1e-45])  # the smallest float32 subnormal
    assert ulp_distance(-tiny, tiny).item() == 2
    assert ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0])).item() == 0
    nan = torch.tensor([float("nan")])
    assert ulp_distance(nan, nan).item() == 0
    assert ulp_distance(nan, torch.tensor([1.0])).item() == float("inf")


def test_ulp_distance_rejects_mixed_inputs() -> None:
    with pytest.raises(ValueError, match="equal shapes"):
        ulp_distance(torch.ones(2), torch.ones(3))
    with pytest.raises(TypeError, match="one float dtype"):
        ulp_distance(torch.ones(2), torch.ones(2, dtype=torch.float64))


def test_diff_summary_reports_count_first_index_and_size() -> None:
    a = torch.zeros(3, 4)
    b = a.clone()
    b[1, 2] = 1e-3
    b[2, 0] = -2.0
    s = diff_summary(a, b)
    assert not s.identical
    assert (s.n_different, s.first_index) == (2, (1, 2))
    assert s.max_abs == pytest.approx(2.0)
    assert s.max_ulp > 0
    assert "2 of 12 elements differ; first at (1, 2)" in str(s)


def test_diff_summary_identical_and_mismatched() -> None:
    a = torch.randn(5)
    assert diff_summary(a, a.clone()).identical
    assert "bitwise identical" in str(diff_summary(a, a.clone()))
    s = diff_summary(a, a[:3])
    assert not s.identical and "shape mismatch" in str(s)


def test_diff_summary_with_nan_on_one_side() -> None:
    a = torch.tensor([1.0, 2.0])
    b = torch.tensor([1.0, float("nan")])
    s = diff_summary(a, b)
    assert s.n_different == 1 and s.max_ulp == float("inf")


def test_diff_summary_ignores_matching_nans() -> None:
    a = torch.tensor([float("nan"), 1.0])
    b = torch.tensor([float("nan"), 1.5])
    s = diff_summary(a, b)
    assert s.n_different == 1 and s.max_abs == 0.5
