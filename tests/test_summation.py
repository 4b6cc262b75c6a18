"""Sums in given orders (detlib.summation): accuracy against exact references, and bitwise properties."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from detlib import summation
from detlib.numerics import bitwise_equal

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 2, 3, 7, 64, 333, 1000]


def _list(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normal numbers times magnitudes over two decades (partial sums stay inside float16's range)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen, dtype=torch.float64) * 10 ** (2 * torch.rand(n, generator=gen))).to(dtype)


def _fsum(x: torch.Tensor) -> float:
    return math.fsum(x.double().tolist())


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _gamma(k: int, dtype: torch.dtype) -> float:
    """Higham's gamma_k = k u / (1 - k u): the error bound factor of k rounded additions (for k u < 1)."""
    ku = k * _unit_roundoff(dtype)
    return ku / (1 - ku) if ku < 1 else math.inf


def _loop_sum(x: torch.Tensor) -> torch.Tensor:
    """Left to right with 0-dim tensors: an independent spelling of the sequential sum."""
    total = x[0]
    for v in x[1:]:
        total = total + v
    return total


# ------------------------------------------------------------------------------------- accuracy bounds
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_sequential_and_pairwise_obey_their_error_bounds(dtype: torch.dtype, n: int) -> None:
    x = _list(n, seed=n, dtype=dtype)
    exact, size = _fsum(x), float(x.double().abs().sum())
    seq = summation.sequential_sum(x).item()
    pair = summation.pairwise_sum(x).item()
    assert abs(seq - exact) <= _gamma(n - 1, dtype) * size  # Higham (4.4); no bound when (n - 1) u >= 1
    assert abs(pair - exact) <= _gamma(max(1, math.ceil(math.log2(n))), dtype) * size  # Higham (4.6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compensated_sums_are_nearly_exact(dtype: torch.dtype) -> None:
    x = _list(1000, seed=3, dtype=dtype)
    exact, size, u = _fsum(x), float(x.double().abs().sum()), _unit_roundoff(dtype)
    bound = 2 * u * abs(exact) + 2 * 1000 * u * u * size  # Higham (4.9): 2u|S| + O(n u^2) sum|x|
    assert abs(summation.kahan_sum(x).item() - exact) <= bound
    assert abs(summation.neumaier_sum(x).item() - exact) <= bound


def test_swallowing_defeats_kahan_but_not_neumaier_or_fsum() -> None:
    x = torch.tensor([0.1, 1e20, -1e20])
    assert summation.sequential_sum(x).item() == 0.0
    assert summation.kahan_sum(x).item() == 0.0
    assert bitwise_equal(summation.neumaier_sum(x), x[0])
    assert bitwise_equal(summation.exact_sum(x), x[0])


# ---------------------------------------------------------------------------------- bitwise properties
@pytest.mark.parametrize("dtype", FLOATS)
def test_sequential_sum_matches_an_element_by_element_loop(dtype: torch.dtype) -> None:
    x = _list(300, seed=1, dtype=torch.float32)
    assert bitwise_equal(summation.sequential_sum(x, dtype), _loop_sum(x.to(dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sequential_sum_matches_numpy_scalars(dtype: torch.dtype) -> None:
    x = _list(500, seed=2, dtype=dtype)
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16}[dtype]
    total = np_dtype(x[0].item())
    for v in x[1:].tolist():
        total = np_dtype(total + np_dtype(v))  # numpy scalar arithmetic rounds to the scalar's type
    assert summation.sequential_sum(x).item() == float(total)


def test_rows_are_summed_independently_and_batch_shapes_kept() -> None:
    x = _list(3 * 4 * 50, seed=4).reshape(3, 4, 50)
    for fn in (summation.sequential_sum, summation.pairwise_sum, summation.kahan_sum, summation.neumaier_sum,
               summation.exact_sum):
        out = fn(x)
        assert out.shape == (3, 4)
        assert bitwise_equal(out[2, 1], fn(x[2, 1].clone()))
    out = summation.blocked_sum(x, 7)
    assert bitwise_equal(out[1, 3], summation.blocked_sum(x[1, 3].clone(), 7))


def test_pairwise_differs_from_sequential_for_some_input() -> None:
    x = _list(1000, seed=5)
    assert not bitwise_equal(summation.pairwise_sum(x), summation.sequential_sum(x))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 10])
@pytest.mark.parametrize("method,block", [("sequential", None), ("pairwise", None), ("blocked", 3), ("blocked", 4)])
def test_tree_expression_is_the_tree_the_method_uses(n: int, method: str, block: int | None) -> None:
    x = _list(n, seed=n + 10)
    names = {f"x{i}": x[i] for i in range(n)}
    evaluated = eval(summation.tree_expression(method, n, block), {}, names)  # noqa: S307 (our own expression)
    fn = {"sequential": summation.sequential_sum, "pairwise": summation.pairwise_sum}.get(method)
    got = summation.blocked_sum(x, block) if method == "blocked" else fn(x)
    assert bitwise_equal(got, torch.as_tensor(evaluated))


@pytest.mark.parametrize("n", [1, 10, 100, 101])
def test_blocked_sum_degenerates_to_sequential(n: int) -> None:
    x = _list(n, seed=6)
    seq = summation.sequential_sum(x)
    assert bitwise_equal(summation.blocked_sum(x, 1), seq)
    assert bitwise_equal(summation.blocked_sum(x, n), seq)
    assert bitwise_equal(summation.blocked_sum(x, n + 5), seq)


def test_blocked_sum_is_the_sequential_sum_of_block_sums() -> None:
    x = _list(103, seed=7)
    partials = torch.stack([_loop_sum(x[i : i + 10]) for i in range(0, 103, 10)])
    assert bitwise_equal(summation.blocked_sum(x, 10), _loop_sum(partials))


@pytest.mark.parametrize("method", ["sequential", "pairwise", "blocked", "kahan", "neumaier", "exact"])
def test_each_order_gives_the_same_bits_every_time(method: str) -> None:
    x = _list(200, seed=8)
    orders = summation.random_orders(200, 300, seed=9)
    first = summation.sums_over_orders(x, orders, method, block=16)
    again = summation.sums_over_orders(x, orders.clone(), method, block=16)
    assert bitwise_equal(first, again)
    one = summation.sums_over_orders(x, orders[:1].expand(50, -1), method, block=16)
    assert summation.count_distinct(one) == 1


def test_sums_over_orders_matches_summing_each_permuted_list() -> None:
    x = _list(60, seed=10)
    orders = summation.random_orders(60, 20, seed=11)
    sums = summation.sums_over_orders(x, orders, "pairwise", dtype=torch.bfloat16)
    for i in (0, 7, 19):
        assert bitwise_equal(sums[i], summation.pairwise_sum(x[orders[i]], torch.bfloat16))


def test_different_orders_give_different_sums() -> None:
    x = _list(1000, seed=12)
    assert summation.count_distinct_sums(x, summation.random_orders(1000, 500, seed=13)) > 10


@pytest.mark.parametrize("dtype", FLOATS)
def test_exact_sum_is_order_independent(dtype: torch.dtype) -> None:
    x = summation.swallowing_list(300, 3 if dtype == torch.float16 else 6, dtype=dtype, seed=14)
    sums = summation.sums_over_orders(x, summation.random_orders(300, 200, seed=15), "exact")
    assert summation.count_distinct(sums) == 1
    assert sums[0].item() == pytest.approx(_fsum(x), rel=torch.finfo(dtype).eps)


def _correctly_rounded(values: list[float], dtype: torch.dtype) -> float:
    """The exact sum of ``values`` rounded to nearest (ties to even) in ``dtype``, with exact fractions."""
    exact = sum((Fraction(v) for v in values), Fraction(0))
    near = torch.tensor(float(exact), dtype=torch.float64).to(dtype)
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[near.element_size()]
    bits = int(near.view(ints))
    candidates = [torch.tensor(b, dtype=ints).view(dtype) for b in (bits - 1, bits, bits + 1)]
    finite = [c for c in candidates if math.isfinite(float(c))]
    return float(min(finite, key=lambda c: (abs(Fraction(float(c)) - exact), int(c.view(ints)) % 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_sum_is_correctly_rounded(dtype: torch.dtype) -> None:
    for seed in range(20):
        x = _list(50, seed=100 + seed, dtype=dtype)
        assert summation.exact_sum(x).item() == _correctly_rounded(x.double().tolist(), dtype)


def test_exact_sum_avoids_double_rounding() -> None:
    # 1 + 2**-24 + 2**-60: float64 rounds it to 1 + 2**-24, exactly halfway between two float32s, and ties to
    # even would then give 1.0; the exact sum is above the midpoint, so the right float32 is 1 + 2**-23.
    x = torch.tensor([1.0, 2.0**-24, 2.0**-60])
    assert summation.exact_sum(x).item() == 1.0 + 2.0**-23
    assert summation.exact_sum(-x).item() == -(1.0 + 2.0**-23)
    assert summation.exact_sum(x[:2]).item() == 1.0  # a true tie stays a tie: to even
    # torch's float64 -> float16 cast goes through float32 and rounds twice: 1 + 2**-11 + 2**-24 would become 1.0
    halves = torch.tensor([1.0, 2.0**-11, 2.0**-24], dtype=torch.float16)
    assert summation.exact_sum(halves).item() == 1.0 + 2.0**-10


def test_exact_sum_rounds_past_the_largest_float_like_ieee() -> None:
    halves = torch.tensor([60000.0, 5504.0, 16.0], dtype=torch.float16)  # exactly 65520: halfway to 2**16
    assert summation.exact_sum(halves).item() == math.inf  # ties to even: overflow
    assert summation.exact_sum(-halves).item() == -math.inf
    below = torch.tensor([60000.0, 5504.0, 15.0], dtype=torch.float16)
    assert summation.exact_sum(below).item() == 65504.0


def test_count_distinct_counts_bit_patterns() -> None:
    assert summation.count_distinct(torch.tensor([0.0, -0.0, 0.0])) == 2
    nan = torch.tensor(float("nan"))
    assert summation.count_distinct(torch.stack([nan, nan.clone(), torch.tensor(1.0)])) == 2
    assert summation.count_distinct(torch.tensor([1.0, 1.0], dtype=torch.bfloat16)) == 1


def test_swallowing_list_cancels_its_large_half() -> None:
    x = summation.swallowing_list(1001, 6, seed=16)
    small = x[x.abs() < 2]
    assert x.shape == (1001,) and small.numel() == 1001 - 2 * (1001 // 4)
    assert summation.exact_sum(x).item() == summation.exact_sum(small).item()
    assert bitwise_equal(x, summation.swallowing_list(1001, 6, seed=16))


def test_ulp_of_is_the_spacing_of_floats() -> None:
    assert summation.ulp_of(1.0, torch.float32) == 2.0**-23
    assert summation.ulp_of(1.5, torch.bfloat16) == 2.0**-7
    assert summation.ulp_of(-1000.0, torch.float16) == 0.5
    assert summation.ulp_of(0.0, torch.float32) == 2.0**-149


def test_study_and_plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    study = summation.study_orders(_list(100, seed=17), 200, "pairwise", seed=18)
    assert study.sums.shape == (200,) and study.distinct == summation.count_distinct(study.sums)
    assert bool((study.ulp_errors == study.ulp_errors.round()).all())  # results are whole ulps apart
    ax = summation.plot_study(study)
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_a_clear_error() -> None:
    x = torch.ones(4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        summation.sequential_sum([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float64, float32"):
        summation.pairwise_sum(torch.ones(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="float64, float32"):
        summation.sequential_sum(x, torch.int64)
    with pytest.raises(ValueError, match="0-dim"):
        summation.sequential_sum(torch.tensor(1.0))
    with pytest.raises(ValueError, match="at least one element"):
        summation.kahan_sum(torch.ones(3, 0))
    with pytest.raises(ValueError, match="block must be a positive int"):
        summation.blocked_sum(x, 0)
    with pytest.raises(ValueError, match="block must be a positive int"):
        summation.sums_over_orders(x, summation.random_orders(4, 2), "blocked")
    with pytest.raises(ValueError, match="unknown method"):
        summation.sums_over_orders(x, summation.random_orders(4, 2), "fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        summation.exact_sum(torch.tensor([1.0, float("inf")]))


def test_bad_orders_are_refused() -> None:
    x = torch.ones(4)
    with pytest.raises(ValueError, match="permutation"):
        summation.count_distinct_sums(x, torch.tensor([[0, 1, 2, 2]]))
    with pytest.raises(ValueError, match="permutation"):
        summation.sums_over_orders(x, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="2-D integer"):
        summation.sums_over_orders(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="1-D tensor"):
        summation.sums_over_orders(torch.ones(2, 4), summation.random_orders(4, 2))
    with pytest.raises(ValueError, match="n >= 1"):
        summation.random_orders(0, 3)
    with pytest.raises(ValueError, match="overflows"):
        summation.swallowing_list(10, 5, dtype=torch.float16)
