"""detlib.reduce: atomic sums depend on the program order, the fixed tree never does."""

from __future__ import annotations

import math

import pytest
import torch

import detlib
from detlib.reduce import (
    atomic_sum,
    count_distinct,
    distinct_results,
    program_order,
    sample_results,
    scheduling_order,
    tree_sum,
)

DEV = detlib.device()
RUNS = 50


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(DEV)


@pytest.mark.parametrize("n,block", [(1, 16), (17, 16), (1000, 64), (4096, 256), (12345, 128)])
@pytest.mark.parametrize("fn", [atomic_sum, tree_sum], ids=["atomic", "tree"])
def test_sums_match_float64(fn, n: int, block: int) -> None:
    x = _x(n, seed=n)
    got = fn(x, block=block, order="random")
    assert got.shape == () and got.dtype == torch.float32
    exact = float(x.double().sum())
    # float32 sums of n standard normals: rounding error well below n * eps * max partial magnitude
    assert abs(float(got) - exact) <= 1e-6 * n + 1e-6, (float(got), exact)


def test_tree_sum_gives_one_result_whatever_the_order() -> None:
    x = _x(32 * 256)
    orders = ["hardware", "reversed"] + ["random"] * 8 + [torch.randperm(32)]
    results = [tree_sum(x, block=256, order=o) for o in orders]
    assert count_distinct(results) == 1


def test_tree_sum_is_run_to_run_deterministic_on_this_backend() -> None:
    x = _x(32 * 256, seed=1)
    assert count_distinct(sample_results(lambda: tree_sum(x, block=256, order=scheduling_order()), 20)) == 1


def test_atomic_sum_varies_with_the_schedule() -> None:
    """The lab's claim: more than one distinct sum over 50 runs (hardware schedule on a GPU, simulated on the CPU)."""
    n, block = (1 << 20, 1024) if not detlib.is_interpreter() else (32 * 256, 256)
    x = _x(n, seed=2)
    sums = sample_results(lambda: atomic_sum(x, block=block, order=scheduling_order()), RUNS)
    assert count_distinct(sums) > 1


@pytest.mark.skipif(not detlib.is_interpreter(), reason="the interpreter runs programs in order; a GPU does not")
def test_interpreter_runs_programs_in_order() -> None:
    """Why the simulation is needed: without it the interpreter's atomic sum never varies."""
    x = _x(16 * 64, seed=3)
    assert distinct_results(lambda: atomic_sum(x, block=64, order="hardware"), 10) == 1
    perm = torch.randperm(16)
    assert detlib.bitwise_equal(atomic_sum(x, block=64, order=perm), atomic_sum(x, block=64, order=perm))


def test_program_order() -> None:
    assert program_order(4).tolist() == [0, 1, 2, 3]
    assert program_order(4, "reversed").tolist() == [3, 2, 1, 0]
    perm = program_order(100, "random", generator=torch.Generator().manual_seed(0))
    assert perm.dtype == torch.int32 and sorted(perm.tolist()) == list(range(100))
    with pytest.raises(ValueError, match="permutation"):
        program_order(3, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="permutation"):
        program_order(3, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="order must be"):
        program_order(3, "sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        program_order(0)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="float32"):
        tree_sum(torch.ones(8, dtype=torch.float64, device=DEV))
    with pytest.raises(ValueError, match="empty"):
        atomic_sum(torch.ones(0, device=DEV))
    with pytest.raises(ValueError, match="power of two"):
        tree_sum(torch.ones(8, device=DEV), block=100)
    with pytest.raises(ValueError, match="contiguous"):
        tree_sum(torch.ones(8, 8, device=DEV).t())
    with pytest.raises(TypeError, match="torch.Tensor"):
        tree_sum([1.0, 2.0])  # type: ignore[arg-type]
    if not detlib.is_interpreter():
        with pytest.raises(ValueError, match="on cpu"):
            tree_sum(torch.ones(8))


def test_distinct_results_counts_bits() -> None:
    values = iter([0.0, -0.0, 0.0, -0.0])
    assert distinct_results(lambda: torch.tensor(next(values)), 4) == 2  # == would say 1
    assert distinct_results(lambda: torch.tensor(math.nan), 5) == 1  # == would say 5
    calls = []
    assert distinct_results(lambda: torch.tensor([float(len(calls.append(1) or calls) % 3)]), 9) == 3
    assert len(calls) == 9
    assert distinct_results(lambda: torch.ones(2, dtype=torch.bfloat16), 3) == 1
    shapes = iter([torch.zeros(2), torch.zeros(1, 2)])
    assert distinct_results(lambda: next(shapes), 2) == 2
    with pytest.raises(ValueError):
        distinct_results(lambda: torch.zeros(1), 0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        distinct_results(lambda: 1.0, 2)  # type: ignore[arg-type, return-value]
